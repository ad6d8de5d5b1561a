"""From a recipe to the commands of every stage of every seed (docs/PIPELINE.md, "Stages").

A *unit* is one command: a stage of one seed, or one checkpoint of an evaluate stage. Its folder
is ``OUT/seed_<s>/<stage>`` (``OUT/seed_<s>/evaluate/<stage>_<best|final>`` for an evaluation;
``OUT/<stage>`` for the generated data and backbone, made once for all seeds). Its command is
the recipe's flags in the recipe's order, with the placeholders filled and, where the recipe
leaves them out, the flags that wire it to the stages before it appended.

Its *identity* is a hash of what decides its result: the script, its arguments and flags (less
the ones that change no result, :data:`COSMETIC`, and the ones the runner adds to continue a
stage, :data:`CONTINUE_FLAGS`) with every input from an earlier stage replaced by that stage's
identity. A stage whose identity changed is run again, and so is every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.recipe import PLACEHOLDER, SHARED_KINDS, TRAINING_KINDS, Recipe, RecipeError, StageSpec
from stages.options import DEFAULTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEED = 1234  # the scripts' --random-seed default (engine/options.py)
# The kinds that run one of the engine's scripts (they take --gpus, --dist, --cpu, the data roots).
ENGINE_KINDS = (*TRAINING_KINDS, "soft_labels", "evaluate")
ENGINE_SCRIPTS = {"source_only": "source_only", "phase1": "phase1", "phase2": "phase2",
                  "soft_labels": "soft_label", "evaluate": "evaluate"}  # kind -> stages.options.STAGES key
# Flags that change no number a stage writes: left out of its identity, so adding one reruns nothing.
COSMETIC = frozenset({"--quiet", "--tensorboard", "--print-every", "--num-workers", "--debug", "--dist_timeout"})
# Flags the runner adds to continue an interrupted stage.
CONTINUE_FLAGS = frozenset({"--resume_from", "--skip_existing"})
BEST = re.compile(r"^GTA5_\d+_[-+0-9.eE]+(?:nan)?\.pth$")
FINAL = re.compile(r"^GTA5_(\d+)\.pth$")


@dataclass
class Unit:
    """One command of the plan."""

    name: str  # "phase1", "evaluate/phase1_best"
    spec: StageSpec
    seed: int | None  # None: shared by every seed (data, backbone)
    folder: str  # absolute
    checkpoint: str | None = None  # evaluate units: "phase1.best"

    @property
    def key(self) -> str:
        """The unit's name within the run: ``seed_1234/phase1``, ``data``."""
        return self.name if self.seed is None else f"seed_{self.seed}/{self.name}"


@dataclass
class Settings:
    """What the runner's own flags decide."""

    out: str  # absolute
    seeds: list[int]
    src: str | None  # --src_rootpath (absolute) or None: the recipe's generated data
    tgt: str | None
    gpus: str | None  # --gpus of every engine script, or None: the recipe's
    launcher: str = "local"  # local: the commands as the recipe has them (--dist spawns); torchrun; slurm (jobs)
    cpu: bool = False  # add --cpu to every engine script (the recipe's device: auto without a GPU)


def show(path: str) -> str:
    """``path`` as the printed commands name it: relative to the repository root (where the commands
    run) when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def units(recipe: Recipe, settings: Settings) -> list[Unit]:
    """Every unit in the order it runs: the shared stages, then each seed's stages."""
    out: list[Unit] = []
    generated = settings.src is None
    for spec in recipe.stages:
        if spec.kind in SHARED_KINDS and (spec.kind != "data" or generated):
            out.append(Unit(spec.name, spec, None, os.path.join(settings.out, spec.name)))
    for seed in settings.seeds:
        seed_dir = os.path.join(settings.out, f"seed_{seed}")
        for spec in recipe.stages:
            if spec.kind in SHARED_KINDS:
                continue
            if spec.kind == "evaluate":
                for ckpt in spec.checkpoints:
                    sub = ckpt.replace(".", "_")
                    out.append(Unit(f"{spec.name}/{sub}", spec, seed, os.path.join(seed_dir, spec.name, sub), ckpt))
            else:
                out.append(Unit(spec.name, spec, seed, os.path.join(seed_dir, spec.name)))
    return out


def wired_flags(unit: Unit, recipe: Recipe, settings: Settings) -> dict[str, Any]:
    """The unit's flags in order: the recipe's, then what wires it (where the recipe leaves it out),
    the seed, and the runner's device flags."""
    spec = unit.spec
    kind = spec.kind
    flags = {**recipe.common, **spec.flags} if kind in ENGINE_KINDS else dict(spec.flags)
    if kind in ENGINE_KINDS:
        flags.setdefault("--snapshot-dir", "{dir}")
        flags.setdefault("--src_rootpath", "{src}")
        flags.setdefault("--tgt_rootpath", "{tgt}")
    if kind == "phase1" and "source_only" in _kinds_before(recipe, spec):
        flags.setdefault("--resume", "{" + _stage_of_kind(recipe, spec, "source_only") + ".final}")
    if kind == "source_only" and "backbone" in _kinds_before(recipe, spec):
        flags.setdefault("--imagenet", "{" + _stage_of_kind(recipe, spec, "backbone") + ".file}")
    if kind in ("soft_labels", "phase2"):
        flags.setdefault("--resume", "{" + _stage_of_kind(recipe, spec, "phase1") + ".best}")
    if kind == "soft_labels":
        flags.setdefault("--output_folder", "{dir}/labels")
    if kind == "phase2":
        flags.setdefault("--soft_labels_folder", "{" + _stage_of_kind(recipe, spec, "soft_labels") + ".folder}")
        flags.setdefault("--thresholds_path", "{" + _stage_of_kind(recipe, spec, "thresholds") + ".file}")
    if kind == "thresholds":
        flags.setdefault("--output", "{dir}/thresholds_p" + (spec.args[0] if spec.args else "0.8") + ".npy")
    if kind == "data":
        flags.setdefault("--out", "{dir}")
    if kind == "backbone":
        flags.setdefault("--out", "{dir}/resnet101_random_init.pth")
    if kind == "evaluate":
        flags["--resume"] = "{" + str(unit.checkpoint) + "}"
    seeded = kind in TRAINING_KINDS and unit.seed is not None
    if seeded and str(unit.seed) != str(flags.get("--random-seed", DEFAULT_SEED)):
        flags["--random-seed"] = str(unit.seed)
    if kind in ENGINE_KINDS:
        if settings.gpus is not None:
            flags["--gpus"] = settings.gpus
        if settings.cpu:
            flags.pop("--gpus", None)
            flags.pop("--dist", None)
            flags["--cpu"] = True
        if settings.launcher == "torchrun":
            flags.pop("--dist", None)
    return flags


def _kinds_before(recipe: Recipe, spec: StageSpec) -> list[str]:
    return [s.kind for s in recipe.stages[: recipe.stages.index(spec)]]


def _stage_of_kind(recipe: Recipe, spec: StageSpec, kind: str) -> str:
    """The name of the last stage of ``kind`` before ``spec``, for a default wiring."""
    for s in reversed(recipe.stages[: recipe.stages.index(spec)]):
        if s.kind == kind:
            return s.name
    raise RecipeError(f"{recipe.path}: stage {spec.name}: needs a {kind} stage before it "
                      f"(or its own flags naming the input)")


def fill(text: str, unit: Unit, resolve: Callable[[str, str], str], settings: Settings) -> str:
    """``text`` with its placeholders replaced; ``resolve(stage, output)`` gives ``{stage.output}``."""

    def one(m: re.Match) -> str:
        stage, output = m.group(1), m.group(2)
        if output is not None:
            return resolve(stage, output)
        if stage == "dir":
            return show(unit.folder)
        if stage == "seed":
            return str(unit.seed)
        root = settings.src if stage == "src" else settings.tgt
        return show(root) if root is not None else resolve("data", stage)

    return PLACEHOLDER.sub(one, text)


def flag_tokens(flags: dict[str, Any], render: Callable[[str], str]) -> list[str]:
    """``--flag value`` tokens in order (a switch ``True`` alone, ``False``/``None`` left out)."""
    out: list[str] = []
    for flag, value in flags.items():
        if value is True or value == "true":
            out.append(flag)
        elif value is False or value is None or value == "false":
            continue
        else:
            out += [flag, render(str(value))]
    return out


def script_tokens(spec: StageSpec) -> list[str]:
    """The interpreter's arguments naming the script: ``train_phase1.py`` or ``-m datasets.synthetic``."""
    return shlex.split(spec.script)


def identity(unit: Unit, flags: dict[str, Any], token: Callable[[str, str], str], settings: Settings) -> str:
    """The hash of what decides the unit's result (see the module docstring)."""
    kept = {k: v for k, v in flags.items() if k not in COSMETIC and k not in CONTINUE_FLAGS}
    anonymous = _anonymous(unit)
    text = {
        "kind": unit.spec.kind,
        "script": unit.spec.script,
        "args": [fill(a, anonymous, token, settings) for a in unit.spec.args],
        "flags": flag_tokens(kept, lambda v: fill(v, anonymous, token, settings)),
    }
    return hashlib.sha256(json.dumps(text, sort_keys=True).encode()).hexdigest()[:16]


def _anonymous(unit: Unit) -> Unit:
    """``unit`` with a folder that is the same for every run (a stage's own folder is not an input)."""
    return Unit(unit.name, unit.spec, unit.seed, os.path.join(REPO, "{dir}"), unit.checkpoint)


def static_output(unit: Unit, output: str, flags: dict[str, Any], render: Callable[[str], str]) -> str | None:
    """An output known from the command alone (``None``: known once the stage has run)."""
    kind = unit.spec.kind
    if kind == "data":
        sub = {"src": "gta5", "tgt": "cityscapes"}[output]
        return os.path.join(render(str(flags["--out"])), sub)
    if kind in ("backbone", "thresholds") and output == "file":
        return render(str(flags["--out" if kind == "backbone" else "--output"]))
    if kind == "soft_labels" and output == "folder":
        return render(str(flags["--output_folder"]))
    if kind in TRAINING_KINDS and output == "final":
        name = final_name(unit.spec.kind, flags)
        return show(os.path.join(unit.folder, name)) if name else None
    return None


def final_name(kind: str, flags: dict[str, Any]) -> str:
    """The final checkpoint's file name from a training stage's flags (engine.trainer.stop_iteration)."""
    if kind == "source_only":
        return "sourceonly.pth"
    defaults = DEFAULTS[ENGINE_SCRIPTS[kind]]
    steps = int(flags.get("--num-steps", defaults["num_steps"]))
    stop = int(flags.get("--num-steps-stop", defaults["num_steps_stop"]))
    return f"GTA5_{stop}.pth" if stop <= steps else ""  # "": no final file (the best ones are the result)


def find_best(folder: str) -> str | None:
    """The best checkpoint ``GTA5_<iter>_<miou>.pth`` a training stage kept (None: it validated never)."""
    if not os.path.isdir(folder):
        return None
    found = sorted(f for f in os.listdir(folder) if BEST.match(f))
    return os.path.join(folder, found[-1]) if found else None
