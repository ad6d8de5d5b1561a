"""What makes runs comparable (docs/RELIABILITY.md): ``<stage>_env.json`` beside ``<stage>_args.json``
(:mod:`engine.provenance`), the dataset fingerprints (:mod:`datasets.fingerprint`) and
``--deterministic`` (:mod:`engine.backends`)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from datasets.fingerprint import fingerprint
from engine import backends, provenance
from stages.options import parse_args
from tests.conftest import NUM_SOURCE, NUM_TARGET_TRAIN, NUM_TARGET_VAL, tiny_args
from tests.helpers import REPO

ENV_KEYS = {"format", "stage", "created_utc", "argv", "git", "versions", "world_size", "nodes", "gpu_count", "gpus",
            "deterministic", "ranks", "data"}
RANK_KEYS = {"rank", "host", "device", "gpu", "capability", "deterministic", "deterministic_warn_only",
             "cudnn_deterministic", "cublas_workspace_config"}
VERSION_KEYS = {"python", "numpy", "torch", "torchvision", "cuda", "cudnn", "nccl", "torch_loaded"}


def _without_roots(record: dict) -> dict:
    """A fingerprint without the (differing) absolute root path."""
    return {k: v for k, v in record.items() if k != "root"}


# ---------------------------------------------------------------------------- fingerprints
def test_fingerprint_counts_every_split_and_hashes_the_sorted_listing(synthetic_data) -> None:
    gta = fingerprint(str(synthetic_data["gta5"]), "gta5")
    assert gta["exists"] and gta["kind"] == "gta5"
    assert {s: v["files"] for s, v in gta["splits"].items()} == {"images": NUM_SOURCE, "labels": NUM_SOURCE}
    lists = {name: entry["files"] for name, entry in gta["lists"].items()}
    assert set(lists) == {"train", "val", "test"} and sum(lists.values()) == NUM_SOURCE
    assert gta["files"]["split.mat"]["size"] == (synthetic_data["gta5"] / "split.mat").stat().st_size
    city = fingerprint(str(synthetic_data["cityscapes"]), "cityscapes")
    assert {s: v["files"] for s, v in city["splits"].items()} == {
        "leftImg8bit/train": NUM_TARGET_TRAIN, "leftImg8bit/val": NUM_TARGET_VAL,
        "gtFine/train": NUM_TARGET_TRAIN, "gtFine/val": NUM_TARGET_VAL}
    # the documented digest: SHA-256 of the sorted "relative_path<TAB>size" lines
    folder = synthetic_data["cityscapes"] / "leftImg8bit" / "train"
    lines = sorted(f"{p.relative_to(folder).as_posix()}\t{p.stat().st_size}\n" for p in folder.rglob("*") if p.is_file())
    assert city["splits"]["leftImg8bit/train"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()


def test_fingerprints_equal_for_copies_and_differ_when_a_file_changes(synthetic_data, tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for name in ("gta5", "cityscapes"):
        shutil.copytree(synthetic_data[name], a / name)
        shutil.copytree(synthetic_data[name], b / name)
    same = {name: _without_roots(fingerprint(str(a / name), kind)) for name, kind in (("gta5", "gta5"),
                                                                                   ("cityscapes", "cityscapes"))}
    assert same == {name: _without_roots(fingerprint(str(b / name), kind))
                    for name, kind in (("gta5", "gta5"), ("cityscapes", "cityscapes"))}
    (b / "gta5" / "images" / ".DS_Store").write_bytes(b"x")  # hidden files are not data
    assert _without_roots(fingerprint(str(b / "gta5"), "gta5")) == same["gta5"]

    label = min((b / "gta5" / "labels").iterdir())
    label.write_bytes(label.read_bytes() + b"\0")  # one file one byte longer
    changed = fingerprint(str(b / "gta5"), "gta5")
    assert changed["splits"]["labels"]["files"] == NUM_SOURCE
    assert changed["splits"]["labels"]["sha256"] != same["gta5"]["splits"]["labels"]["sha256"]
    assert changed["splits"]["images"] == same["gta5"]["splits"]["images"]

    val = b / "cityscapes" / "leftImg8bit" / "val"
    city = next(val.iterdir())
    shutil.copy(next(city.iterdir()), city / "extra_000000_000019_leftImg8bit.png")  # one file more
    added = fingerprint(str(b / "cityscapes"), "cityscapes")
    assert added["splits"]["leftImg8bit/val"]["files"] == NUM_TARGET_VAL + 1
    assert added["splits"]["leftImg8bit/val"]["sha256"] != same["cityscapes"]["splits"]["leftImg8bit/val"]["sha256"]
    assert added["splits"]["gtFine/val"] == same["cityscapes"]["splits"]["gtFine/val"]


def test_fingerprint_of_missing_roots_synthia_and_soft_labels(tmp_path) -> None:
    missing = fingerprint(str(tmp_path / "nowhere"), "gta5")
    assert missing["exists"] is False and missing["lists"] is None
    assert all(s == {"missing": True, "files": 0, "sha256": None} for s in missing["splits"].values())
    assert missing["files"] == {"split.mat": None, "gtav_label_info.p": None}
    root = tmp_path / "synthia"
    for sub in ("RGB", "GT/LABELS"):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            (root / sub / f"{i:07d}.png").write_bytes(b"p" * (i + 1))
    synthia = fingerprint(str(root), "synthia")
    assert {s: v["files"] for s, v in synthia["splits"].items()} == {"RGB": 3, "GT/LABELS": 3}
    soft = tmp_path / "soft"
    (soft / "nested").mkdir(parents=True)
    for name in ("a.npy", "b.npy", "notes.txt", "nested/c.npy", ".a.npy.0123.tmp"):
        (soft / name).write_bytes(b"0")
    assert fingerprint(str(soft), "soft_labels")["splits"]["."]["files"] == 2  # the folder's own .npy files
    with pytest.raises(ValueError, match="unknown dataset kind"):
        fingerprint(str(soft), "kitti")


# ---------------------------------------------------------------------------- git, versions
def test_git_state_is_the_checkout_s_or_null(monkeypatch, tmp_path) -> None:
    state = provenance.git_state()
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert state["commit"] == head.stdout.strip() and isinstance(state["modified"], bool)
        assert state["modified"] == bool(state["changes"])
    monkeypatch.setattr(provenance, "REPO", str(tmp_path))  # not a repository
    assert provenance.git_state() == {"commit": None, "modified": None, "changes": None}
    monkeypatch.setattr(provenance, "REPO", REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert provenance.git_state() == {"commit": None, "modified": None, "changes": None}


# ---------------------------------------------------------------------------- --deterministic
def test_deterministic_with_cudnn_benchmark_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args("phase1", "test", ["--cpu", "--deterministic", "--cudnn_benchmark"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --deterministic:") and "--cudnn_benchmark" in err[0]
    for stage in ("phase1", "phase2", "source_only", "soft_label", "evaluate"):  # every script has the flag
        assert parse_args(stage, "test", ["--cpu", "--deterministic"]).deterministic is True
        assert parse_args(stage, "test", ["--cpu"]).deterministic is False


def test_cublas_workspace_for_deterministic_runs(monkeypatch, capsys) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    backends.deterministic_environment(False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    backends.deterministic_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other reproducible value: kept
    backends.deterministic_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and capsys.readouterr().err == ""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    backends.deterministic_environment(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert capsys.readouterr().err.startswith("warning: --deterministic: CUBLAS_WORKSPACE_CONFIG=:0:0")


# ---------------------------------------------------------------------------- real runs
def _env_and_args(folder: Path, name: str) -> tuple[dict, dict]:
    return (json.loads((folder / f"{name}_env.json").read_text()), json.loads((folder / f"{name}_args.json").read_text()))


def check_env_record(env: dict, stage: str) -> None:
    """The keys and the values every ``<stage>_env.json`` of a CPU run on this machine must have."""
    assert set(env) == ENV_KEYS and env["format"] == provenance.FORMAT and env["stage"] == stage
    assert set(env["versions"]) == VERSION_KEYS
    assert env["versions"]["python"] == platform.python_version()
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["torchvision"] == torchvision.__version__
    assert env["versions"]["cuda"] == torch.version.cuda and env["versions"]["torch_loaded"] is True
    assert env["git"] == provenance.git_state()  # nothing changed in the checkout meanwhile
    assert all(set(r) == RANK_KEYS for r in env["ranks"])
    assert env["nodes"] == 1 and env["gpu_count"] == 0 and env["gpus"] == []  # CPU ranks on this machine


@pytest.mark.slow
def test_deterministic_ddp_run_records_every_rank(synthetic_data, sourceonly_ckpt, tmp_path) -> None:
    """generate_soft_label.py --dist (two spawned gloo ranks) --deterministic: every rank ran
    with deterministic algorithms and the cuBLAS workspace it inherited from the launcher; the
    script reads the target only, so only the target root is fingerprinted. (A training run
    without the flag: tests/test_phase1_train.py::test_single_process_outputs.)"""
    snap = tmp_path / "s"
    env_vars = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    proc = subprocess.run(
        [sys.executable, "generate_soft_label.py", *tiny_args(synthetic_data), "--num-workers", "0", "--batch-size", "2",
         "--resume", str(sourceonly_ckpt), "--output_folder", str(tmp_path / "soft"), "--dist", "--gpus", "0,1",
         "--deterministic", "--snapshot-dir", str(snap)],
        cwd=REPO, env={**env_vars, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    env, args = _env_and_args(snap, "soft_labels")
    check_env_record(env, "soft_labels")
    assert args["deterministic"] is True and args["world_size"] == 2
    assert env["world_size"] == 2 and [r["rank"] for r in env["ranks"]] == [0, 1]
    assert env["deterministic"] is True
    for r in env["ranks"]:
        assert (r["deterministic"], r["deterministic_warn_only"], r["cudnn_deterministic"]) == (True, True, True), r
        assert r["cublas_workspace_config"] == ":4096:8", r
    assert env["data"] == {"target": fingerprint(str(synthetic_data["cityscapes"]), "cityscapes")}
    assert env["data"]["target"]["splits"]["leftImg8bit/train"]["files"] == NUM_TARGET_TRAIN
    assert len(list((tmp_path / "soft").glob("*.npy"))) == NUM_TARGET_TRAIN  # the run did its work


def test_get_thresholds_writes_its_records_beside_the_output(tmp_path, capsys) -> None:
    from datasets.get_thresholds import main
    from tests.helpers import PARITY

    soft = tmp_path / "soft"
    shutil.copytree(Path(PARITY) / "soft_labels", soft)
    out = tmp_path / "out" / "t_p0.8.npy"
    out.parent.mkdir()
    assert main(["0.8", str(soft), "--output", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # nothing printed with --quiet, as before
    assert sorted(p.name for p in out.parent.iterdir()) == ["t_p0.8.npy", "t_p0.8_args.json", "t_p0.8_env.json"]
    env, args = _env_and_args(out.parent, "t_p0.8")
    assert set(env) == ENV_KEYS and env["stage"] == "thresholds" and env["world_size"] == 1
    assert args["p"] == 0.8 and args["output"] == str(out) and args["folder"] == str(soft)
    files = len(list(soft.glob("*.npy")))
    assert env["data"] == {"soft_labels": fingerprint(str(soft), "soft_labels")}
    assert env["data"]["soft_labels"]["splits"]["."]["files"] == files
    # bad input: exit 2, no record
    assert main(["0.8", str(tmp_path / "missing"), "--output", str(tmp_path / "m.npy")]) == 2
    assert not list(tmp_path.glob("m*"))
