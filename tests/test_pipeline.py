"""``pipeline.py`` through its command line (docs/PIPELINE.md): the GTA5 recipe's dry run is the
original README's four commands; a two-seed run of the demo recipe at tiny sizes
(``tests/data/tiny_recipe.yaml``) writes ``report.json`` in its documented shape with
``evaluate.py``'s numbers; a rerun skips everything; a changed flag reruns exactly the stages it
affects; ``--report`` compares run folders; a wrong dataset root fails in one line before any
training. Interrupted runs: tests/test_pipeline_interrupted.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

DATA = Path(__file__).parent / "data"
TINY = str(DATA / "tiny_recipe.yaml")
RUN_TIMEOUT_S = 1200


def pipeline(*args: str, check: bool = True, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "pipeline.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    if check:
        assert proc.returncode == 0, f"pipeline.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n" \
                                     f"{proc.stderr[-6000:]}"
    return proc


def commands(dry_run_output: str) -> dict[str, list[str]]:
    """``{unit: argv}`` from a dry run's ``# unit (...)`` / command line pairs."""
    out, name = {}, None
    for line in dry_run_output.splitlines():
        if line.startswith("# "):
            name = line[2:].split(" (")[0]
        elif line.strip() and name:
            out[name] = shlex.split(line)
            name = None
    return out


def flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """``[(flag, value or None), ...]`` in order."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            out.append((argv[i], value))
            i += 2 if value is not None else 1
        else:
            i += 1
    return out


# ---------------------------------------------------------------------------- the GTA5 recipe
def test_dry_run_of_the_gta5_recipe_is_the_original_readme(tmp_path):
    """Flag for flag, in order: every flag and value of the original README's commands, with the
    paths it leaves to the user ([YOUR_SOURCE_DATA_ROOT], ./snapshots/..., [PATH_OF_PHASE1_MODEL],
    the soft-label folder and thresholds file) wired to the run's folders; the thresholds command
    names its output file with --output (the original writes it into its working directory)."""
    src, tgt, out = tmp_path / "gta5", tmp_path / "cityscapes", tmp_path / "run"
    shown = pipeline("recipes/gta5_to_cityscapes.yaml", "--out", str(out), "--src_rootpath", str(src),
                     "--tgt_rootpath", str(tgt), "--dry_run").stdout
    got = commands(shown)
    lines = [ln for ln in (DATA / "original_readme_commands.txt").read_text().splitlines() if ln and ln[0] != "#"]
    original = [shlex.split(ln.split("&& ")[-1]) for ln in lines]
    seed = out / "seed_1234"
    best = str(seed / "phase1" / "GTA5_<iter>_<miou>.pth")
    soft = str(seed / "soft_labels" / "gta2city_soft_labels")
    thresholds = str(seed / "thresholds" / "gta2city_soft_labels_thresholds_p0.8.npy")
    wired = {"[YOUR_SOURCE_DATA_ROOT]": str(src), "[YOUR_TARGET_DATA_ROOT]": str(tgt), "[PATH_OF_PHASE1_MODEL]": best,
             "./datasets/gta2city_soft_labels": soft, "./datasets/gta2city_soft_labels_thresholds_p0.8.npy": thresholds}
    for unit, orig in zip(("seed_1234/phase1", "seed_1234/soft_labels", "seed_1234/phase2"),
                          (original[0], original[1], original[3])):
        argv = got[unit]
        assert argv[:2] == orig[:2]  # python3 SCRIPT
        expected = [(f, wired.get(v, v)) for f, v in flags(orig)]
        expected = [(f, str(seed / unit.split("/")[1]) if f == "--snapshot-dir" else v) for f, v in expected]
        assert flags(argv) == expected
    argv = got["seed_1234/thresholds"]
    assert argv[:4] == ["python3", "datasets/get_thresholds.py", original[2][2], soft]
    assert os.path.basename(argv[3]) == original[2][3]
    assert flags(argv) == [("--output", thresholds)]
    # the dataset check comes first, and every checkpoint is evaluated
    assert shown.splitlines()[0] == "# dataset check"
    assert [u for u in got if "evaluate" in u] == [f"seed_1234/evaluate/{c}" for c in
                                                   ("phase1_best", "phase1_final", "phase2_best", "phase2_final")]
    assert dict(flags(got["seed_1234/evaluate/phase2_final"]))["--resume"] == str(seed / "phase2" / "GTA5_40000.pth")


def test_seeds_gpus_and_set_in_the_dry_run(tmp_path):
    """--seeds: one folder per seed, --random-seed on the training scripts only (none for the
    scripts' own default 1234); --gpus on every script; --set all.FLAG: every stage whose script
    takes the flag; --launcher torchrun: torchrun instead of --dist."""
    shown = pipeline("recipes/gta5_to_cityscapes.yaml", "--out", str(tmp_path / "r"), "--src_rootpath", "S",
                     "--tgt_rootpath", "T", "--seeds", "1234,7", "--gpus", "0,1", "--set", "all.batch_size_val=2",
                     "--set", "phase2.learning-rate=1e-3", "--launcher", "torchrun", "--dry_run").stdout
    got = commands(shown)
    assert "--random-seed" not in got["seed_1234/phase1"]
    for unit, argv in got.items():
        f = dict(flags(argv))
        if unit.startswith("seed_7/") and unit.split("/")[1] in ("phase1", "phase2"):
            assert f["--random-seed"] == "7"
        elif unit.startswith("seed_"):
            assert "--random-seed" not in f
        if unit.split("/")[-1] != "thresholds" and unit != "dataset check":
            assert argv[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"], argv
            assert f["--gpus"] == "0,1" and f["--batch_size_val"] == "2" and "--dist" not in f
    assert dict(flags(got["seed_7/phase2"]))["--learning-rate"] == "1e-3"
    assert dict(flags(got["seed_7/phase1"])).get("--learning-rate") is None


@pytest.mark.parametrize("args, message", [
    (["--set", "phase9.x=1"], "--set phase9.x=1: the recipe has no stage 'phase9'"),
    (["--set", "thresholds.gpus=1"], "--set thresholds.gpus=1: datasets/get_thresholds.py takes no flag --gpus"),
    (["--set", "phase1"], "--set phase1: expected STAGE.FLAG=VALUE"),
    (["--seeds", "1,1"], "--seeds: expected distinct integers"),
])
def test_bad_arguments_get_one_line(tmp_path, capsys, args, message):
    from runner.cli import main

    code = main(["recipes/gta5_to_cityscapes.yaml", "--out", str(tmp_path / "r"), "--src_rootpath", "S",
                 "--tgt_rootpath", "T", "--dry_run", *args])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_bad_recipe_gets_one_line_naming_it(tmp_path, capsys):
    from runner.cli import main

    recipe = tmp_path / "r.yaml"
    argv = [str(recipe), "--out", str(tmp_path / "o"), "--src_rootpath", "S", "--tgt_rootpath", "T"]
    recipe.write_text("stages:\n  - name: phase1\n    script: train_phase1.py\n    flags:\n      --learning_rate: 1\n")
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {recipe}: stage phase1: train_phase1.py takes no flag --learning_rate\n"
    recipe.write_text("stages:\n  - name: phase2\n    script: train_phase2.py\n    flags:\n      --resume: '{phase1.best}'\n")
    assert main(argv) == 2
    assert "{phase1.best} names no earlier stage" in capsys.readouterr().err
    recipe.write_text("stages: [\n")
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {recipe}: not valid YAML")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_wrong_root_fails_in_one_line_before_training(tmp_path, synthetic_data):
    """A GTA5 root without split.mat: the dataset check stops the run in one line, before any stage."""
    import shutil

    src = tmp_path / "gta5"
    shutil.copytree(synthetic_data["gta5"], src)
    (src / "split.mat").unlink()
    out = tmp_path / "run"
    t0 = time.time()
    proc = pipeline(TINY, "--out", str(out), "--src_rootpath", str(src), "--tgt_rootpath",
                    str(synthetic_data["cityscapes"]), "--quiet", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset check failed:") and "split.mat" in err[0], err
    assert time.time() - t0 < 120
    assert not (out / "seed_1234").exists()


# ---------------------------------------------------------------------------- real runs (tiny)
@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory) -> Path:
    """The tiny demo recipe, seeds 1234 and 1235, run to the end; ``--drop_states`` keeps the
    suite's disk use down (each training stage's latest.pth is ~450 MB)."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    pipeline(TINY, "--out", str(out), "--seeds", "1234,1235", "--quiet", "--latex", "--drop_states")
    return out


@pytest.mark.slow
def test_drop_states_removes_only_the_finished_training_states(two_seeds):
    for seed in ("seed_1234", "seed_1235"):
        for stage, final in (("source_only", "sourceonly.pth"), ("phase1", "GTA5_4.pth"), ("phase2", "GTA5_4.pth")):
            folder = two_seeds / seed / stage
            assert (folder / final).is_file() and not (folder / "latest.pth").exists(), sorted(os.listdir(folder))


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_seed_report_has_the_documented_shape_and_evaluate_numbers(two_seeds):
    report = load_json(two_seeds / "report.json")
    assert list(report["stages"]) == [f"{s}/{w}" for s in ("source_only", "phase1", "phase2") for w in ("best", "final")]
    classes = report["classes"]
    assert classes[:3] == ["road", "sidewalk", "building"] and classes[-1] == "bicycle" and len(classes) == 19
    for key, e in report["stages"].items():
        assert set(e) >= {"seeds", "miou_mean", "miou_std", "n", "iou_mean", "iou_std"}
        assert e["n"] == 2 and set(e["seeds"]) == {"1234", "1235"}
        mious = [e["seeds"][s]["miou"] for s in ("1234", "1235")]
        assert e["miou_mean"] == pytest.approx(sum(mious) / 2)
        assert e["miou_std"] == pytest.approx(abs(mious[0] - mious[1]) / 2 ** 0.5)
        assert all(len(e["seeds"][s]["iou"]) == 19 for s in e["seeds"]) and len(e["iou_mean"]) == 19
        for seed in ("1234", "1235"):  # the numbers are the evaluate stage's results file, in percent
            res = load_json(two_seeds / f"seed_{seed}" / "evaluate" / key.replace("/", "_") / "results.json")
            assert e["seeds"][seed]["miou"] == 100 * res["miou"]
            assert e["seeds"][seed]["iou"] == [100 * res["iou"][c] for c in classes]
    assert set(report["pseudo_labels"]) == {"phase1", "phase2"}
    assert set(report["time"]) >= {"source_only", "phase1", "soft_labels", "thresholds", "phase2"}
    assert report["deterministic"] is False
    md = (two_seeds / "report.md").read_text()
    assert "| phase2/final |" in md and "seed 1235" in md and "Pseudo-label accuracy" in md
    assert (two_seeds / "report.tex").read_text().count("\\\\") == len(report["stages"])


@pytest.mark.slow
def test_report_numbers_equal_evaluate_py_run_by_hand(two_seeds, tmp_path):
    """evaluate.py, run by hand on seed 1235's phase-2 final checkpoint, gives the report's numbers."""
    marker = load_json(two_seeds / "seed_1235" / "evaluate" / "phase2_final" / "pipeline_stage.json")
    argv = shlex.split(marker["command"])[1:]
    f = dict(flags(argv))
    res = tmp_path / "results.json"
    # the printed command, with its own snapshot folder, predictions folder and results file
    argv[argv.index("--snapshot-dir") + 1] = str(tmp_path / "eval")
    argv[argv.index("--save_dir") + 1] = str(tmp_path / "preds")
    subprocess.run([sys.executable, *argv, "--results_json", str(res)], cwd=REPO, check=True, capture_output=True)
    assert f["--resume"].endswith(os.path.join("seed_1235", "phase2", "GTA5_4.pth"))
    report = load_json(two_seeds / "report.json")["stages"]["phase2/final"]["seeds"]["1235"]
    by_hand = load_json(res)
    assert report["miou"] == 100 * by_hand["miou"]
    assert report["iou"] == [100 * v for v in by_hand["iou"].values()]


@pytest.mark.slow
def test_rerun_skips_everything(two_seeds):
    before = {p: p.stat().st_mtime_ns for p in two_seeds.rglob("*.pth")}
    out = pipeline(TINY, "--out", str(two_seeds), "--seeds", "1234,1235", "--quiet").stdout
    units = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert units and all(ln.endswith("finished earlier: skipped") for ln in units if not ln.startswith("[check"))
    assert len([ln for ln in units if ln.endswith("skipped")]) == 2 + 2 * (5 + 6)  # data, backbone; 5 stages, 6 evals
    assert " runs: " not in out and "[check]" not in out
    assert {p: p.stat().st_mtime_ns for p in two_seeds.rglob("*.pth")} == before


@pytest.mark.slow
def test_report_compares_run_folders_side_by_side(two_seeds):
    """``--report A B``: a row per stage with each folder's mean ± std (n) and B - A."""
    compared = pipeline("--report", str(two_seeds), str(two_seeds)).stdout
    stages = load_json(two_seeds / "report.json")["stages"]
    rows = [ln.strip("| ").split(" | ") for ln in compared.splitlines() if ln.startswith(("| phase", "| source"))]
    assert [r[0] for r in rows[:6]] == list(stages)  # then the per-class differences
    for key, left, right, diff in rows[:6]:
        assert left == right and left.startswith(f"{stages[key]['miou_mean']:.2f} ± ") and left.endswith("(2)"), \
            (key, left, right)
        assert diff == "+0.00", (key, diff)


def test_slurm_dry_run_prints_the_chained_sbatch_commands(tmp_path):
    """--launcher slurm --dry_run: one requeue-safe sbatch job per stage, each after the one before
    (afterok), running this pipeline command for that one stage (--only), then the report's job."""
    shown = pipeline("recipes/gta5_to_cityscapes.yaml", "--out", str(tmp_path / "r"), "--src_rootpath", "S",
                     "--tgt_rootpath", "T", "--launcher", "slurm", "--sbatch_args", "--partition=gpu --time=24:00:00",
                     "--dry_run").stdout
    jobs = commands(shown)
    units = ["seed_1234/phase1", "seed_1234/soft_labels", "seed_1234/thresholds", "seed_1234/phase2",
             *[f"seed_1234/evaluate/{c}" for c in ("phase1_best", "phase1_final", "phase2_best", "phase2_final")]]
    assert list(jobs) == [*units, "report"]
    previous = None
    for unit, argv in jobs.items():
        assert argv[0] == "sbatch" and "--open-mode=append" in argv and "--partition=gpu" in argv
        options = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        assert options.get("--dependency") == (None if previous is None else f"afterok:<job id of {previous}>")
        wrapped = shlex.split(argv[argv.index("--wrap") + 1])
        assert wrapped[0] == "srun"
        if unit == "report":
            assert "--no-requeue" in argv and wrapped[-2:] == ["--report", str(tmp_path / "r")]
            continue
        assert "--requeue" in argv and options["--signal"].startswith("USR1@")
        assert wrapped[wrapped.index("--only") + 1] == unit and "pipeline.py" in wrapped
        assert wrapped[wrapped.index("--out") + 1] == str(tmp_path / "r") and "--launcher" not in wrapped
        gpus = "4" if unit.split("/")[1] != "thresholds" else None
        assert options.get("--gpus-per-node") == gpus
        previous = unit
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_changed_flag_reruns_exactly_the_stages_it_affects(two_seeds):
    """(Last in this file: it changes the two-seed run.) Phase 2's learning rate changed for seed 1234: the dry run names phase 2 and its
    evaluations with the reason; the run reruns exactly those, and keeps everything else."""
    args = [TINY, "--out", str(two_seeds), "--seeds", "1234", "--quiet", "--drop_states",
            "--set", "phase2.learning-rate=1e-3"]
    shown = pipeline(*args, "--dry_run").stdout
    again = [ln for ln in shown.splitlines() if ln.startswith("# ") and "runs again" in ln]
    assert again == ["# seed_1234/phase2 (runs again: --learning-rate 2.5e-4 -> 1e-3)",
                     "# seed_1234/evaluate/phase2_best (runs again: its input seed_1234/phase2 runs again)",
                     "# seed_1234/evaluate/phase2_final (runs again: its input seed_1234/phase2 runs again)"]
    kept = {p: p.stat().st_mtime_ns for p in (two_seeds / "seed_1234").rglob("*.pth") if "phase2" not in str(p)}
    out = pipeline(*args).stdout
    ran = [ln.split("]")[0][1:] for ln in out.splitlines() if " runs: " in ln]
    assert ran == ["seed_1234/phase2", "seed_1234/evaluate/phase2_best", "seed_1234/evaluate/phase2_final"]
    assert "runs again: --learning-rate 2.5e-4 -> 1e-3" in out
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (two_seeds / "seed_1234" / "phase2.previous" / "pipeline_stage.json").is_file()
    marker = load_json(two_seeds / "seed_1234" / "phase2" / "pipeline_stage.json")
    assert "--learning-rate 1e-3" in marker["command"] and marker["state"] == "finished"
