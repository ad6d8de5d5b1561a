"""``pipeline.py``: the whole protocol of a recipe, for one or several seeds, then the report
(docs/PIPELINE.md).

    python3 pipeline.py RECIPE --out DIR [--src_rootpath R --tgt_rootpath R] [--seeds 1234,1235,1236]
        [--gpus 0,1,2,3] [--launcher local|torchrun] [--set STAGE.FLAG=VALUE ...] [--dry_run] [--quiet] [--latex]
    python3 pipeline.py --report DIR [DIR2 ...]

The runner is a thin layer over the scripts: it starts each as its own process, from the
repository root, with exactly the command it prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

from datasets import synthetic
from model import random_backbone
from runner import report as reports
from runner.execute import ChildProcess, Pipeline, PipelineError, gpus_used, inputs_of, run_unit, say
from runner.plan import ENGINE_KINDS, ENGINE_SCRIPTS, REPO, Settings, show
from runner.recipe import TRAINING_KINDS, Recipe, RecipeError, apply_overrides, load_recipe
from stages import offline_thresholds
from stages.options import build_parser as engine_parser
from utils.files import atomic_write
from utils.slurm import SbatchJob, sbatch_command, submit

DEMO_RECIPE = os.path.join("recipes", "demo.yaml")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 pipeline.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", nargs="?", default=None,
                   help=f"recipe file (YAML or JSON); default {DEMO_RECIPE} (generated data) when no dataset root "
                        "is given")
    p.add_argument("--out", default=None, help="run folder: DIR/seed_<s>/<stage>/, DIR/report.md (default for the "
                                               "demo recipe: demo_out)")
    p.add_argument("--src_rootpath", default=None, help="source dataset root (GTA5 or SYNTHIA layout)")
    p.add_argument("--tgt_rootpath", default=None, help="target dataset root (Cityscapes layout)")
    p.add_argument("--seeds", default="1234", help="comma-separated seeds; the protocol runs once per seed "
                                                   "(1234 is the scripts' default --random-seed)")
    p.add_argument("--gpus", default=None, help="GPU ids given to every script as --gpus (default: the recipe's)")
    p.add_argument("--cpu", action="store_true", help="give every script --cpu (instead of its --gpus / --dist)")
    p.add_argument("--launcher", default="local", choices=["local", "torchrun", "slurm"],
                   help="local: the commands as the recipe writes them (--dist spawns one process per GPU); "
                        "torchrun: torchrun --standalone --nproc_per_node N instead of --dist; slurm: submit each "
                        "stage as an sbatch job, chained with --dependency=afterok (docs/PIPELINE.md)")
    p.add_argument("--sbatch_args", default="",
                   help="--launcher slurm: further sbatch options of every job, e.g. '--partition=gpu --time=24:00:00'")
    p.add_argument("--only", default=None, metavar="UNIT",
                   help="run this one stage (e.g. seed_1234/phase1) if it is not finished: what each SLURM job runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FLAG=VALUE",
                   help="override a stage's flag (STAGE 'all': every stage whose script takes it); VALUE true / "
                        "false for switches; repeatable")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--quiet", action="store_true",
                   help="the scripts' output goes to <stage folder>/console.log instead of the terminal")
    p.add_argument("--latex", action="store_true", help="also write DIR/report.tex (the table rows)")
    p.add_argument("--drop_states", action="store_true",
                   help="remove a training stage's latest.pth (optimizer and all, the largest file) once the stage "
                        "has finished; its checkpoints stay")
    p.add_argument("--report", nargs="+", metavar="DIR", default=None,
                   help="write the report of finished run folder(s) again and print it; with two or more, compare "
                        "them side by side")
    return p


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def script_flags(spec_kind: str) -> set[str]:
    """The flags a stage's script takes (its parser's option strings)."""
    if spec_kind in ENGINE_SCRIPTS:
        parser = engine_parser(ENGINE_SCRIPTS[spec_kind], "")
    else:
        parser = {"thresholds": offline_thresholds, "data": synthetic, "backbone": random_backbone}[spec_kind].build_parser()
    return {o for a in parser._actions for o in a.option_strings}


def check_flags(recipe: Recipe) -> None:
    """Every flag of every stage is one its script takes (a typo fails here, not hours later)."""
    for s in recipe.stages:
        known = script_flags(s.kind)
        for flag in s.flags:
            if flag not in known:
                raise RecipeError(f"{recipe.path}: stage {s.name}: {s.script} takes no flag {flag}")
    if recipe.common:
        known = script_flags("phase1")  # every engine script takes the same flags
        for flag in recipe.common:
            if flag not in known:
                raise RecipeError(f"{recipe.path}: common: the scripts take no flag {flag}")


def _record_run(out: str, recipe: Recipe, settings: Settings, argv: Sequence[str]) -> None:
    os.makedirs(out, exist_ok=True)
    record = {"recipe": show(recipe.path), "description": recipe.description, "seeds": settings.seeds,
              "kinds": {s.name: s.kind for s in recipe.stages},
              "checkpoints": {s.name: s.checkpoints for s in recipe.stages if s.kind == "evaluate"}, "argv": list(argv),
              "src_rootpath": settings.src, "tgt_rootpath": settings.tgt, "launcher": settings.launcher}
    atomic_write(os.path.join(out, reports.RUN_FILE), lambda f: f.write(json.dumps(record, indent=2)), mode="w")


def run_dataset_check(pipeline: Pipeline) -> None:
    """``datasets.check`` before the first stage: a wrong root fails in seconds, in one line."""
    argv = pipeline.dataset_check()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        problems = [ln[len("problem: "):] for ln in proc.stdout.splitlines() if ln.startswith("problem: ")]
        first = problems[0] if problems else (proc.stderr.strip().splitlines() or ["no details"])[-1]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise PipelineError(f"dataset check failed: {first}{more}; see python3 {' '.join(argv)}", 2)
    say("[check] the datasets are ready (python3 -m datasets.check --headers-only)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.report:
            return _report_only(args.report, args.latex)
        return _run(args, argv)
    except (RecipeError, PipelineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "code", 2)


def _report_only(folders: list[str], with_latex: bool) -> int:
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, reports.RUN_FILE)):
            raise RecipeError(f"--report {folder}: not a pipeline.py run folder (no {reports.RUN_FILE})")
    if len(folders) == 1:
        say(reports.markdown(reports.write(folders[0], with_latex)))
    else:
        say(reports.compare(folders))
    return 0


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if (args.src_rootpath is None) != (args.tgt_rootpath is None):
        raise RecipeError("--src_rootpath and --tgt_rootpath: give both or neither")
    recipe_path = args.recipe or os.path.join(REPO, DEMO_RECIPE)
    if args.recipe is None and args.src_rootpath is not None:
        raise RecipeError("RECIPE: name the recipe for real data, e.g. recipes/gta5_to_cityscapes.yaml")
    recipe = load_recipe(recipe_path)
    check_flags(recipe)
    recipe = apply_overrides(recipe, args.overrides, lambda s: script_flags(s.kind))
    generated = any(s.kind == "data" for s in recipe.stages)
    if args.src_rootpath is None and not generated:
        raise RecipeError(f"--src_rootpath / --tgt_rootpath: {show(recipe.path)} has no generated data; give the "
                          "dataset roots")
    out = args.out
    if out is None:
        if os.path.abspath(recipe_path) != os.path.join(REPO, DEMO_RECIPE):
            raise RecipeError("--out: required (the run folder)")
        out = os.path.join(REPO, "demo_out")
    cpu = args.cpu
    if recipe.device == "auto" and args.gpus is None and not cpu:
        import torch

        cpu = not torch.cuda.is_available()
    settings = Settings(out=os.path.abspath(out), seeds=_seeds(args.seeds),
                        src=os.path.abspath(args.src_rootpath) if args.src_rootpath else None,
                        tgt=os.path.abspath(args.tgt_rootpath) if args.tgt_rootpath else None,
                        gpus=args.gpus, launcher=args.launcher, cpu=cpu)
    pipeline = Pipeline(recipe, settings)
    decisions = pipeline.decisions()
    if args.only is not None:
        return _run_only(pipeline, decisions, args)
    if args.launcher == "slurm":
        return _submit(pipeline, decisions, args, recipe, settings, argv)
    if args.dry_run:
        return _dry_run(pipeline, decisions)
    child = ChildProcess()
    _record_run(settings.out, recipe, settings, argv)
    say(f"pipeline: {show(recipe.path)} -> {show(settings.out)}, seeds {', '.join(map(str, settings.seeds))}")
    _announce(pipeline, decisions)
    checked = False
    for unit in pipeline.units:
        what, _ = decisions[unit.key]
        if what == "skip":
            _drop_state(unit, args.drop_states)  # finished in an earlier run that ended before its drop
            continue
        if child.signalled is not None:
            raise PipelineError("stopped by a signal between stages; the same pipeline.py command continues", 1)
        if not checked and unit.spec.kind in ENGINE_KINDS:
            run_dataset_check(pipeline)
            checked = True
        run_unit(pipeline, unit, what, child, args.quiet)
        _drop_state(unit, args.drop_states)
    report = reports.write(settings.out, args.latex)
    say(f"\nreport: {show(os.path.join(settings.out, 'report.md'))}, {show(os.path.join(settings.out, 'report.json'))}")
    for key, e in report["stages"].items():
        std = "" if e["miou_std"] is None else f" ± {e['miou_std']:.2f}"
        say(f"  {key}: mIoU {e['miou_mean']:.2f}{std} (n = {e['n']})")
    return 0


def _run_only(pipeline: Pipeline, decisions: dict[str, tuple[str, str]], args: argparse.Namespace) -> int:
    """``--only UNIT``: that one stage, once the stages it reads have finished (a SLURM job's command)."""
    if args.only not in pipeline.by_key:
        raise RecipeError(f"--only {args.only}: no such stage in this run (its stages: "
                          f"{', '.join(u.key for u in pipeline.units)})")
    unit = pipeline.by_key[args.only]
    what, why = decisions[unit.key]
    if what == "skip":
        say(f"[{unit.key}] finished earlier: skipped")
        return 0
    for key in inputs_of(pipeline, unit):
        if decisions[key][0] != "skip":
            raise PipelineError(f"--only {unit.key}: its input {key} has not finished", 2)
    if why:
        say(f"[{unit.key}] runs again: {why}")
    if unit is next(u for u in pipeline.units if u.spec.kind in ENGINE_KINDS):
        run_dataset_check(pipeline)  # the first stage that reads the data (it may have been generated by a job)
    run_unit(pipeline, unit, what, ChildProcess(), args.quiet)
    _drop_state(unit, args.drop_states)
    return 0


def _drop_state(unit, drop: bool) -> None:
    state = os.path.join(unit.folder, "latest.pth")
    if drop and unit.spec.kind in TRAINING_KINDS and os.path.isfile(state):
        os.unlink(state)


def _unit_argv(args: argparse.Namespace, settings: Settings, recipe: Recipe, key: str) -> list[str]:
    """The command of the SLURM job that runs stage ``key``: this run's flags with ``--only key``."""
    argv = [sys.executable, "pipeline.py", recipe.path, "--out", settings.out, "--seeds",
            ",".join(map(str, settings.seeds))]
    if settings.src is not None:
        argv += ["--src_rootpath", settings.src, "--tgt_rootpath", str(settings.tgt)]
    if args.gpus is not None:
        argv += ["--gpus", args.gpus]
    if args.cpu:
        argv.append("--cpu")
    for override in args.overrides:
        argv += ["--set", override]
    argv += [flag for flag, on in (("--quiet", args.quiet), ("--drop_states", args.drop_states)) if on]
    return [*argv, "--only", key]


def _submit(pipeline: Pipeline, decisions: dict[str, tuple[str, str]], args: argparse.Namespace, recipe: Recipe,
            settings: Settings, argv: list[str]) -> int:
    """``--launcher slurm``: one requeue-safe sbatch job per stage still to run, each waiting for the one
    before (``--dependency=afterok``), then a job that writes the report. ``--dry_run`` prints them."""
    extra = shlex.split(args.sbatch_args)
    logs = os.path.join(settings.out, "slurm")
    jobs: list[tuple[str, SbatchJob]] = []
    for unit in pipeline.units:
        if decisions[unit.key][0] == "skip":
            continue
        cmd = pipeline.commands[unit.key]
        name = unit.key.replace("/", "-")
        jobs.append((unit.key, SbatchJob(_unit_argv(args, settings, recipe, unit.key), f"decouplenet-{name}",
                                         os.path.join(logs, f"{name}-%j.out"), gpus_per_node=gpus_used(cmd),
                                         chdir=REPO, extra=extra)))
    report = [sys.executable, "pipeline.py", "--report", settings.out] + (["--latex"] if args.latex else [])
    jobs.append(("report", SbatchJob(report, "decouplenet-report", os.path.join(logs, "report-%j.out"),
                                     chdir=REPO, requeue=False, extra=extra)))
    if args.dry_run:
        previous = None
        for key, job in jobs:
            if previous is not None:
                job = dataclasses.replace(job, dependency=f"<job id of {previous}>")
            say(f"# {key}")
            say(shlex.join(sbatch_command(job)))
            previous = key
        return 0
    if all(decisions[u.key][0] == "skip" for u in pipeline.units if u.spec.kind == "data"):
        run_dataset_check(pipeline)  # now, in seconds; generated data is checked by the first job that reads it
    _record_run(settings.out, recipe, settings, argv)
    os.makedirs(logs, exist_ok=True)
    submitted: dict[str, str] = {}
    previous_id = None
    for key, job in jobs:
        previous_id = submit(dataclasses.replace(job, dependency=previous_id))
        submitted[key] = previous_id
        say(f"[{key}] submitted as SLURM job {previous_id}")
    atomic_write(os.path.join(settings.out, "slurm_jobs.json"), lambda f: f.write(json.dumps(submitted, indent=2)),
                 mode="w")
    say(f"{len(jobs)} jobs submitted; logs in {show(logs)}; a failed stage cancels the jobs after it "
        "(--kill-on-invalid-dep); the same command submits what is left")
    return 0


def _announce(pipeline: Pipeline, decisions: dict[str, tuple[str, str]]) -> None:
    """One line per stage that is skipped or run again, saying why."""
    for unit in pipeline.units:
        what, why = decisions[unit.key]
        if what == "skip":
            say(f"[{unit.key}] finished earlier: skipped")
        elif what == "rerun":
            say(f"[{unit.key}] runs again: {why}")
        elif what == "continue":
            say(f"[{unit.key}] was interrupted: continues")


def _dry_run(pipeline: Pipeline, decisions: dict[str, tuple[str, str]]) -> int:
    checked = False
    for unit in pipeline.units:
        if not checked and unit.spec.kind in ENGINE_KINDS:
            say("# dataset check")
            say("python3 " + shlex.join(pipeline.dataset_check()))
            checked = True
        what, why = decisions[unit.key]
        note = {"skip": "finished: skipped", "rerun": f"runs again: {why}", "continue": "continues",
                "run": "runs"}[what]
        cmd = pipeline.commands[unit.key]
        extra = pipeline.continue_flags(unit) if what == "continue" else []
        say(f"# {unit.key} ({note})")
        say(cmd.shown + ("" if not extra else " " + shlex.join(extra)))
    return 0
