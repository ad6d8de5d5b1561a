"""Running the plan: each unit as its own process, skipped when finished, continued when
interrupted, run again when its identity changed (docs/PIPELINE.md, "Stages").

Each unit's folder holds ``pipeline_stage.json``, written atomically: its identity, command and
state (``running`` from the moment it starts, ``finished`` once its process exited 0 and its
outputs exist), the seconds of its finished attempts and its outputs. The runner can be killed
at any moment: a rerun finds the unit ``running`` and continues it, a training stage from its
``latest.pth`` (``--resume_from auto``), the soft labels with ``--skip_existing``; the other
stages are short and run again from the start. Their outputs are written atomically, so what
they leave is complete or absent.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.plan import (
    CONTINUE_FLAGS,
    COSMETIC,
    ENGINE_KINDS,
    REPO,
    Settings,
    Unit,
    fill,
    find_best,
    flag_tokens,
    identity,
    script_tokens,
    show,
    static_output,
    units,
    wired_flags,
)
from runner.recipe import TRAINING_KINDS, Recipe, references
from utils.files import atomic_write, move_folder

MARKER = "pipeline_stage.json"
LATEST = "latest.pth"  # engine.state's training state


class PipelineError(RuntimeError):
    """A stage failed or cannot start; the message is the one line the runner prints."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def say(text: str = "") -> None:
    print(text, flush=True)


def read_marker(folder: str) -> dict | None:
    path = os.path.join(folder, MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); remove the folder to run the stage again", 2) from None


def write_marker(folder: str, record: dict) -> None:
    atomic_write(os.path.join(folder, MARKER), lambda f: f.write(json.dumps(record, indent=2, sort_keys=True)),
                 mode="w")


@dataclass
class Command:
    """A unit's command, as printed (``shown``) and as run (``argv``, from the repository root)."""

    unit: Unit
    tokens: list[str]  # after the interpreter (script or -m module, arguments, flags)
    identity: str
    flags: dict[str, Any]  # the rendered flags, for saying what changed
    launcher_prefix: list[str] = field(default_factory=list)  # torchrun's own arguments

    @property
    def shown(self) -> str:
        if self.launcher_prefix:
            return shlex.join(["torchrun", *self.launcher_prefix, *self.tokens])
        return shlex.join(["python3", *self.tokens])

    @property
    def argv(self) -> list[str]:
        head = ["-m", "torch.distributed.run", *self.launcher_prefix] if self.launcher_prefix else []
        return [sys.executable, *head, *self.tokens]


class Pipeline:
    """The units of one recipe and run folder, their commands and their states."""

    def __init__(self, recipe: Recipe, settings: Settings) -> None:
        self.recipe = recipe
        self.settings = settings
        self.units = units(recipe, settings)
        self.by_key = {u.key: u for u in self.units}
        self.commands: dict[str, Command] = {}
        for u in self.units:  # in order: a unit's inputs are known before it
            self.commands[u.key] = self._command(u)

    # ------------------------------------------------------------------ commands
    def unit_of(self, unit: Unit, stage: str) -> Unit:
        """The unit of ``stage`` that ``unit`` reads from (same seed, or shared)."""
        for key in (f"seed_{unit.seed}/{stage}", stage):
            if key in self.by_key:
                return self.by_key[key]
        raise PipelineError(f"{self.recipe.path}: stage {unit.spec.name} reads stage {stage}, which this run "
                            "does not make (the generated data is skipped when --src_rootpath is given)", 2)

    def output(self, unit: Unit, stage: str, output: str) -> str:
        """``{stage.output}`` for ``unit``: a path, or a description while it is not known yet."""
        source = self.unit_of(unit, stage)
        cmd = self.commands[source.key]
        known = static_output(source, output, cmd.flags, lambda v: v)
        if known is not None:
            return known
        if output == "best":
            best = find_best(source.folder)
            return show(best) if best else show(os.path.join(source.folder, "GTA5_<iter>_<miou>.pth"))
        raise PipelineError(f"{self.recipe.path}: stage {unit.spec.name} reads {{{stage}.{output}}}, which "
                            f"{stage} does not write (its --num-steps-stop is beyond --num-steps: no final "
                            "checkpoint; read its .best)", 2)

    def _command(self, unit: Unit) -> Command:
        flags = wired_flags(unit, self.recipe, self.settings)

        def resolve(stage: str, output: str) -> str:
            return self.output(unit, stage, output)

        def token(stage: str, output: str) -> str:
            return f"<{stage}:{self.commands[self.unit_of(unit, stage).key].identity}>.{output}"

        def render(v: str) -> str:
            return fill(v, unit, resolve, self.settings)

        rendered = {k: (render(v) if isinstance(v, str) and v not in ("true", "false") else v)
                    for k, v in flags.items()}
        tokens = [*script_tokens(unit.spec), *[render(a) for a in unit.spec.args], *flag_tokens(flags, render)]
        prefix: list[str] = []
        if self.settings.launcher == "torchrun" and unit.spec.kind in ENGINE_KINDS:
            n = 1 if "--cpu" in flags else len(str(flags.get("--gpus", "0,1")).split(","))
            prefix = ["--standalone", f"--nproc_per_node={n}"]
        return Command(unit, tokens, identity(unit, flags, token, self.settings), rendered, prefix)

    def refresh(self, unit: Unit) -> Command:
        """The unit's command again, now that the stages before it have run (their best checkpoints
        are known); its identity does not change."""
        self.commands[unit.key] = self._command(unit)
        return self.commands[unit.key]

    def missing_best(self, unit: Unit) -> str | None:
        """For an evaluation of ``STAGE.best`` whose stage kept no best checkpoint: why."""
        if unit.spec.kind != "evaluate" or not str(unit.checkpoint).endswith(".best"):
            return None
        source = self.unit_of(unit, str(unit.checkpoint).split(".")[0])
        if find_best(source.folder):
            return None
        return (f"{source.key} kept no best checkpoint (it validates every --save-pred-every iterations and keeps "
                "a checkpoint when the mIoU beats the best so far, starting from 0)")

    def dataset_check(self) -> list[str]:
        """The dataset check's command (``datasets.check``, label headers only: seconds)."""
        first = next(u for u in self.units if u.spec.kind in ENGINE_KINDS)
        flags = self.commands[first.key].flags
        return ["-m", "datasets.check", "--src_rootpath", flags["--src_rootpath"], "--tgt_rootpath",
                flags["--tgt_rootpath"], "--src_dataset", self.recipe.source, "--num-classes",
                str(self.recipe.num_classes), "--headers-only"]

    # ------------------------------------------------------------------ states
    def decisions(self) -> dict[str, tuple[str, str]]:
        """Per unit ``(what, why)``: what is ``skip``, ``continue``, ``rerun`` or ``run``."""
        out: dict[str, tuple[str, str]] = {}
        rerun: set[str] = set()
        for u in self.units:
            cmd = self.commands[u.key]
            marker = read_marker(u.folder)
            if marker is None:
                if os.path.isdir(u.folder) and os.listdir(u.folder):
                    raise PipelineError(f"{show(u.folder)}: exists but was not written by pipeline.py; move it away "
                                        "or choose another --out", 2)
                out[u.key] = ("run", "")
            elif marker.get("identity") != cmd.identity:
                inputs = [s for s in inputs_of(self, u) if s in rerun]
                why = (f"its input {', '.join(inputs)} runs again" if inputs
                       else changed_flags(marker.get("flags", {}), cmd.flags) or "its command changed")
                out[u.key] = ("rerun", why)
            elif marker.get("state") == "finished":
                out[u.key] = ("skip", "")
            else:
                out[u.key] = ("continue", "")
            if out[u.key][0] in ("rerun", "run", "continue"):
                rerun.add(u.key)
        return out

    def continue_flags(self, unit: Unit) -> list[str]:
        """What a rerun of an interrupted unit adds: a training state or the soft labels written."""
        kind = unit.spec.kind
        if kind in TRAINING_KINDS and os.path.isfile(os.path.join(unit.folder, LATEST)):
            return ["--resume_from", "auto"]
        if kind == "soft_labels":
            folder = os.path.join(REPO, self.commands[unit.key].flags["--output_folder"])
            if os.path.isdir(folder) and os.listdir(folder):
                return ["--skip_existing"]
        return []

    def outputs(self, unit: Unit) -> dict[str, str]:
        """A finished unit's outputs (what later stages and the report read), checked to exist."""
        cmd = self.commands[unit.key]
        kind = unit.spec.kind
        found: dict[str, str] = {}
        if kind in TRAINING_KINDS:
            best = find_best(unit.folder)
            if best:
                found["best"] = show(best)
            final = static_output(unit, "final", cmd.flags, lambda v: v)
            if final:
                found["final"] = final
        elif kind == "soft_labels":
            found["folder"] = cmd.flags["--output_folder"]
        elif kind in ("thresholds", "backbone"):
            found["file"] = cmd.flags["--output" if kind == "thresholds" else "--out"]
        elif kind == "evaluate":
            found["results"] = show(os.path.join(unit.folder, "results.json"))
        elif kind == "data":
            found.update(src=static_output(unit, "src", cmd.flags, lambda v: v) or "",
                         tgt=static_output(unit, "tgt", cmd.flags, lambda v: v) or "")
        for name, path in found.items():
            if not os.path.exists(os.path.join(REPO, path)):
                raise PipelineError(f"{unit.key}: exited 0 but wrote no {name} ({path})")
        return found


def inputs_of(pipeline: Pipeline, unit: Unit) -> list[str]:
    """The keys of the units whose outputs ``unit`` reads."""
    texts = [str(v) for v in wired_flags(unit, pipeline.recipe, pipeline.settings).values()] + list(unit.spec.args)
    out = []
    for text in texts:
        for stage, output in references(text):
            if output is None and (stage not in ("src", "tgt") or pipeline.settings.src is not None):
                continue
            try:
                key = pipeline.unit_of(unit, stage if output is not None else "data").key
            except PipelineError:
                continue
            if key not in out:
                out.append(key)
    return out


def changed_flags(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``--learning-rate 2.5e-4 -> 1e-3, --flip added`` (flags that decide the result only)."""
    parts = []
    for k in list(before) + [k for k in after if k not in before]:
        if k in COSMETIC or k in CONTINUE_FLAGS or k == "--snapshot-dir":
            continue
        a, b = before.get(k), after.get(k)
        if a == b:
            continue
        if a in (None, False):
            parts.append(f"{k} added" if b is True else f"{k} {b} added")
        elif b in (None, False):
            parts.append(f"{k} removed")
        else:
            parts.append(f"{k} {a} -> {b}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- running
class ChildProcess:
    """The running stage's process; the runner's SIGTERM, SIGINT and SIGUSR1 are passed on to it, so
    that a training stage saves and stops at its iteration boundary (docs/RELIABILITY.md)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.signalled: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._forward)

    def _forward(self, signum: int, _frame: Any) -> None:
        self.signalled = signum
        # In a SLURM job step, SLURM signals every process of the step itself: a second copy of the signal
        # would make the stage stop without saving (docs/RELIABILITY.md).
        in_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
        if self.proc is not None and self.proc.poll() is None and not in_step:
            self.proc.send_signal(signum)

    def run(self, argv: list[str], log_path: str | None) -> int:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 (closed below)
        try:
            # preexec_fn is safe here: the runner starts no threads
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509
            while True:
                try:
                    return self.proc.wait()
                except InterruptedError:
                    continue
        finally:
            self.proc = None
            if log is not None:
                log.close()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the runner dies (Linux), so a killed runner leaves no stage running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def gpus_used(cmd: Command) -> int:
    """How many GPUs the unit's command asks for (0 with --cpu)."""
    if cmd.unit.spec.kind not in ENGINE_KINDS or "--cpu" in cmd.flags:
        return 0
    n = len(str(cmd.flags.get("--gpus", "0,1")).split(","))
    return n if cmd.launcher_prefix or "--dist" in cmd.flags else 1


def run_unit(pipeline: Pipeline, unit: Unit, what: str, child: ChildProcess, quiet: bool,
             on_finished: Callable[[], None] | None = None) -> None:
    """Run (or continue) one unit and record it; :class:`PipelineError` when it fails."""
    cmd = pipeline.refresh(unit)
    missing = pipeline.missing_best(unit)
    if missing is not None:  # nothing to evaluate: recorded as finished, so a rerun does not ask again
        os.makedirs(unit.folder, exist_ok=True)
        write_marker(unit.folder, {"identity": cmd.identity, "command": cmd.shown, "flags": cmd.flags,
                                   "state": "finished", "seconds": 0.0, "attempts": 0, "gpus": 0, "key": unit.key,
                                   "outputs": {}, "note": missing})
        say(f"[{unit.key}] not run: {missing}")
        return
    marker = read_marker(unit.folder) if what == "continue" else None
    if what == "rerun" and os.path.isdir(unit.folder):
        previous = unit.folder.rstrip(os.sep) + ".previous"
        move_folder(unit.folder, previous)
        say(f"[{unit.key}] the previous results moved to {show(previous)}")
    os.makedirs(unit.folder, exist_ok=True)
    extra = pipeline.continue_flags(unit) if what == "continue" else []
    seconds = float(marker.get("seconds", 0.0)) if marker else 0.0
    attempts = int(marker.get("attempts", 0)) + 1 if marker else 1
    record = {"identity": cmd.identity, "command": cmd.shown, "flags": cmd.flags, "state": "running",
              "seconds": seconds, "attempts": attempts, "gpus": gpus_used(cmd), "key": unit.key}
    write_marker(unit.folder, record)
    shown = cmd.shown + ("" if not extra else " " + shlex.join(extra))
    say(f"[{unit.key}] {'continues' if extra else 'runs'}: {shown}")
    log_path = os.path.join(unit.folder, "console.log") if quiet else None
    t0 = time.time()
    rc = child.run(cmd.argv + extra, log_path)
    took = time.time() - t0
    if rc != 0:
        if log_path and os.path.isfile(log_path):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = f.readlines()[-15:]
            sys.stdout.write("".join("    " + t for t in tail))
        if child.signalled is not None:
            raise PipelineError(f"{unit.key} stopped by signal {signal.Signals(child.signalled).name} after {took:.0f}s "
                                f"(exit code {rc}); the same pipeline.py command continues the run", rc or 1)
        where = f"; its output: {show(log_path)}" if log_path else ""
        raise PipelineError(f"{unit.key} failed with exit code {rc} after {took:.0f}s{where}; fix the cause and "
                            "run the same pipeline.py command to continue", 1)
    record.update(state="finished", seconds=round(seconds + took, 3), outputs=pipeline.outputs(unit),
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_marker(unit.folder, record)
    say(f"[{unit.key}] finished in {took:.0f}s")
    if on_finished is not None:
        on_finished()
