"""Recipes: the stages of one protocol and each stage's flags, in a small YAML or JSON file
(docs/PIPELINE.md, "Recipes").

A recipe lists stages in order. Each stage names its script and its flags, in the order its
command line prints them. Flag values may hold placeholders that the runner fills in:

* ``{dir}``: the stage's own folder, ``OUT/seed_<s>/<stage>``;
* ``{src}``, ``{tgt}``: the source and target dataset roots;
* ``{seed}``: the run's seed;
* ``{STAGE.OUTPUT}``: an output of an earlier stage, e.g. ``{phase1.best}``, ``{phase1.final}``,
  ``{soft_labels.folder}``, ``{thresholds.file}``, ``{source_only.final}``, ``{backbone.file}``.

Loading checks the file, one line naming it and what is wrong (:class:`RecipeError`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

# The stage kinds the runner knows; a stage's kind is its name unless it says ``kind:``.
TRAINING_KINDS = ("source_only", "phase1", "phase2")
KINDS = ("data", "backbone", *TRAINING_KINDS, "soft_labels", "thresholds", "evaluate")

# What each kind's stage gives to later ones (``{STAGE.OUTPUT}``).
OUTPUTS = {
    "data": ("src", "tgt"),
    "backbone": ("file",),
    "source_only": ("best", "final"),
    "phase1": ("best", "final"),
    "phase2": ("best", "final"),
    "soft_labels": ("folder",),
    "thresholds": ("file",),
    "evaluate": (),
}

# Stages made once for every seed (in OUT/, not OUT/seed_<s>/): the generated data and backbone.
SHARED_KINDS = ("data", "backbone")

PLACEHOLDER = re.compile(r"\{([a-z0-9_]+)(?:\.([a-z0-9_]+))?\}")


class RecipeError(ValueError):
    """A recipe, or an override of it, is wrong; the message names the file or flag."""


@dataclass
class StageSpec:
    """One stage of a recipe: its script and its command line (flags in order)."""

    name: str
    kind: str
    script: str  # a path relative to the repository root, or "-m module"
    flags: dict[str, Any] = field(default_factory=dict)  # "--flag": value (True: a switch; False/None: absent)
    args: list[Any] = field(default_factory=list)  # positional arguments (get_thresholds.py's P FOLDER)
    checkpoints: list[str] = field(default_factory=list)  # evaluate: "STAGE.best" / "STAGE.final"


@dataclass
class Recipe:
    path: str
    description: str
    source: str  # gta5 | synthia: the source dataset kind (the dataset check, fingerprints)
    num_classes: int
    stages: list[StageSpec]
    device: str = "recipe"  # "auto": --cpu is added when torch sees no GPU (the demo)
    common: dict[str, Any] = field(default_factory=dict)  # flags of every stage that runs an engine script

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    import yaml  # only for YAML recipes

    try:  # BaseLoader: every value stays the text it is (5e-4 stays "5e-4", as the command line has it)
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise RecipeError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', exc)})") from None


def _flag_name(path: str, where: str, name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"--[A-Za-z][A-Za-z0-9_-]*", name):
        raise RecipeError(f"{path}: {where}: {name!r} is not a flag (write it as --name)")
    return name


def _flags(path: str, where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: {where}: 'flags' must be a mapping of --flag: value")
    out = {}
    for k, v in raw.items():
        if isinstance(v, (list, dict)):
            raise RecipeError(f"{path}: {where}: {k}: a flag's value is one number, word or true/false")
        out[_flag_name(path, where, k)] = v if isinstance(v, bool) or v is None else str(v)
    return out


def load_recipe(path: str) -> Recipe:
    """The recipe at ``path`` (``.yaml``/``.yml``/``.json``), checked."""
    raw = _read(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise RecipeError(f"{path}: a recipe is a mapping with a non-empty list 'stages'")
    unknown = set(raw) - {"description", "source", "num_classes", "stages", "device", "common"}
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: description, source, "
                          "num_classes, device, common, stages)")
    source = raw.get("source", "gta5")
    if source not in ("gta5", "synthia"):
        raise RecipeError(f"{path}: source: {source!r} is not gta5 or synthia")
    num_classes = str(raw.get("num_classes", 16 if source == "synthia" else 19))
    if num_classes not in ("19", "16", "13"):
        raise RecipeError(f"{path}: num_classes: {num_classes!r} is not 19, 16 or 13")
    device = raw.get("device", "recipe")
    if device not in ("recipe", "auto"):
        raise RecipeError(f"{path}: device: {device!r} is not 'recipe' (the flags as written) or 'auto'")
    stages: list[StageSpec] = []
    for i, s in enumerate(raw["stages"]):
        where = f"stage {i + 1}"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s.get("script"):
            raise RecipeError(f"{path}: {where}: each stage needs a 'name' and a 'script'")
        extra = set(s) - {"name", "kind", "script", "flags", "args", "checkpoints"}
        if extra:
            raise RecipeError(f"{path}: stage {s['name']}: unknown key(s) {', '.join(sorted(extra))}")
        name, kind = s["name"], s.get("kind", s["name"])
        where = f"stage {name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise RecipeError(f"{path}: {where}: a stage name is lower-case letters, digits and _")
        if kind == "data" and name != "data":
            raise RecipeError(f"{path}: {where}: the generated-data stage is named 'data'")
        if kind not in KINDS:
            raise RecipeError(f"{path}: {where}: kind {kind!r} is not one of {', '.join(KINDS)}")
        if name in (t.name for t in stages):
            raise RecipeError(f"{path}: {where}: two stages share the name")
        args = s.get("args") or []
        if not isinstance(args, list):
            raise RecipeError(f"{path}: {where}: 'args' must be a list")
        checkpoints = s.get("checkpoints") or []
        if kind == "evaluate" and not checkpoints:
            raise RecipeError(f"{path}: {where}: an evaluate stage lists its 'checkpoints' (e.g. phase1.best)")
        stages.append(StageSpec(name, kind, str(s["script"]), _flags(path, where, s.get("flags")),
                                [str(a) for a in args], [str(c) for c in checkpoints]))
    common = _flags(path, "common", raw.get("common"))
    recipe = Recipe(path, str(raw.get("description", "")), source, int(num_classes), stages, device, common)
    check_references(recipe)
    return recipe


def references(text: str) -> list[tuple[str, str | None]]:
    """The placeholders in ``text``: ``[("phase1", "best"), ("dir", None), ...]``."""
    return [(m.group(1), m.group(2)) for m in PLACEHOLDER.finditer(text)]


def check_references(recipe: Recipe) -> None:
    """Every ``{STAGE.OUTPUT}`` names an earlier stage and one of its outputs."""
    seen: dict[str, str] = {}
    for s in recipe.stages:
        texts = [str(v) for v in s.flags.values() if not isinstance(v, bool)] + list(s.args)
        texts += ["{" + c + "}" for c in s.checkpoints]
        for text in texts:
            for stage, output in references(text):
                if output is None:
                    if stage not in ("dir", "src", "tgt", "seed"):
                        raise RecipeError(f"{recipe.path}: stage {s.name}: unknown placeholder {{{stage}}} "
                                          "(known: {dir}, {src}, {tgt}, {seed}, {STAGE.OUTPUT})")
                    continue
                if stage not in seen:
                    raise RecipeError(f"{recipe.path}: stage {s.name}: {{{stage}.{output}}} names no earlier stage")
                if output not in OUTPUTS[seen[stage]]:
                    raise RecipeError(f"{recipe.path}: stage {s.name}: {{{stage}.{output}}}: a {seen[stage]} stage "
                                      f"gives {', '.join(OUTPUTS[seen[stage]]) or 'nothing'}")
        seen[s.name] = s.kind


def parse_value(text: str) -> Any:
    """An override's value: ``true``/``false`` for switches, else the text as given."""
    if text.lower() == "true":
        return True
    if text.lower() == "false":
        return False
    return text


def apply_overrides(recipe: Recipe, overrides: list[str], flags_of: Any) -> Recipe:
    """``--set STAGE.FLAG=VALUE`` applied in order to a copy of ``recipe``.

    ``STAGE`` is a stage name or ``all`` (every stage whose script takes ``--FLAG``); ``FLAG``
    is written with or without its leading ``--``; ``VALUE`` ``false`` removes a switch or flag.
    ``flags_of(stage)`` gives the flags the stage's script takes.
    """
    out = copy.deepcopy(recipe)
    for text in overrides:
        m = re.fullmatch(r"([a-z][a-z0-9_]*)\.(-{0,2})([A-Za-z][A-Za-z0-9_-]*)=(.*)", text, re.DOTALL)
        if not m:
            raise RecipeError(f"--set {text}: expected STAGE.FLAG=VALUE, e.g. phase1.learning-rate=1e-3 "
                              "(STAGE a stage of the recipe or 'all')")
        target, _, name, value = m.groups()
        flag = "--" + name
        if target == "all":
            chosen = [s for s in out.stages if flag in flags_of(s)]
            if not chosen:
                raise RecipeError(f"--set {text}: no stage's script takes {flag}")
        else:
            try:
                chosen = [out.stage(target)]
            except KeyError:
                raise RecipeError(f"--set {text}: the recipe has no stage {target!r} "
                                  f"(its stages: {', '.join(out.names)}, or 'all')") from None
            if flag not in flags_of(chosen[0]):
                raise RecipeError(f"--set {text}: {chosen[0].script} takes no flag {flag}")
        for s in chosen:
            s.flags[flag] = parse_value(value)
    check_references(out)
    return out
