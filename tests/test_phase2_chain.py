"""The README chain on the CPU (docs/METHOD.md sections 4-7): phase 1 -> generate_soft_label.py ->
datasets/get_thresholds.py -> train_phase2.py, plus phase-2 exact resume, soft-label
interoperability with official checkpoints, and clear errors for bad phase-2 inputs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from model import DecoupleNet
from tests.conftest import SOFT_HW, assert_same_state, run_script, target_train_basenames, tiny_args
from tests.helpers import PARITY, REPO, filled_phase1_checkpoint

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

PHASE2_GROUPS = {"model_B2_state_dict", "model_B_state_dict", "head_state_dict", "classifier_state_dict"}
ONE_LINE_ENV = {"OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
TINY_CITYSCAPES = Path(PARITY) / "cityscapes_tiny"


def read_metrics(snapshot: Path) -> list[dict]:
    with open(snapshot / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- the README chain
@pytest.fixture(scope="module")
def chain(synthetic_data, sourceonly_ckpt, tmp_path_factory):
    """The four README commands in order (tiny sizes, one CPU process, README flags otherwise),
    under umask 022 (inherited by the scripts) for the file-mode checks."""
    old_umask = os.umask(0o022)
    try:
        yield from _chain(synthetic_data, sourceonly_ckpt, tmp_path_factory)
    finally:
        os.umask(old_umask)


def _chain(synthetic_data, sourceonly_ckpt, tmp_path_factory):
    work = tmp_path_factory.mktemp("chain")
    snaps = work / "snapshots"
    data = tiny_args(synthetic_data)
    out = {"work": work}
    # 1. phase 1 (short)
    out["phase1"] = run_script([
        "train_phase1.py", "--snapshot-dir", snaps / "GTA2Cityscapes_phase1", "--batch-size", "2", "--tensorboard",
        *data, "--resume", sourceonly_ckpt, "--num-steps", "2", "--num-steps-stop", "2", "--num-workers", "0"])
    phase1_ckpt = snaps / "GTA2Cityscapes_phase1" / "GTA5_2.pth"
    out["phase1_ckpt"] = phase1_ckpt
    # 2. soft labels
    soft = work / "gta2city_soft_labels"
    out["soft"] = soft
    out["generate"] = run_script([
        "generate_soft_label.py", "--snapshot-dir", snaps / "GTA2Cityscapes_generate_soft_labels",
        "--batch-size", "2", "--tensorboard", *data, "--resume", phase1_ckpt, "--output_folder", soft,
        "--no_droplast", "--num-workers", "0"])
    # 3. thresholds: `cd <folder holding the soft labels> && python get_thresholds.py 0.8 gta2city_soft_labels`
    out["thresholds_cmd"] = run_script([Path(REPO) / "datasets" / "get_thresholds.py", "0.8", "gta2city_soft_labels"],
                                       cwd=work)
    thresholds = work / "gta2city_soft_labels_thresholds_p0.8.npy"
    out["thresholds"] = thresholds
    # 4. phase 2
    out["phase2_snapshot"] = snaps / "GTA2Cityscapes_phase2"
    out["phase2"] = run_script([
        "train_phase2.py", "--snapshot-dir", out["phase2_snapshot"], "--batch-size", "2", "--tensorboard",
        "--learning-rate", "5e-4", *data, "--soft_labels_folder", soft, "--resume", phase1_ckpt,
        "--thresholds_path", thresholds, "--num-steps", "2", "--num-steps-stop", "2", "--num-workers", "0"])
    yield out
    shutil.rmtree(snaps, ignore_errors=True)


def test_readme_chain(chain, synthetic_data) -> None:
    # phase 1
    p1 = load(chain["phase1_ckpt"])
    assert DecoupleNet(layer=1).load_official(p1) == "phase1"
    # soft labels: one float32 [19, H/8, W/8] logits file per Cityscapes train image
    names = target_train_basenames(synthetic_data)
    assert len(names) >= 2
    files = sorted(os.listdir(chain["soft"]))
    assert files == sorted(f"{n}.npy" for n in names), files
    for name in files:
        arr = np.load(chain["soft"] / name)
        assert arr.dtype == np.float32 and arr.shape == (19, *SOFT_HW), (name, arr.dtype, arr.shape)
        assert np.isfinite(arr).all()
    # thresholds: written next to the soft-label folder (relative FOLDER from the working dir)
    thr = np.load(chain["thresholds"])
    assert thr.shape == (19,) and np.isfinite(thr).all() and (thr >= 0).all() and (thr <= 1).all(), thr
    assert not (Path(REPO) / "datasets" / "gta2city_soft_labels_thresholds_p0.8.npy").exists()
    # phase 2: exactly the four phase-2 groups, loadable as the phase-2 layout
    snap = chain["phase2_snapshot"]
    p2 = load(snap / "GTA5_2.pth")
    assert set(p2) == PHASE2_GROUPS, sorted(p2)
    assert DecoupleNet(layer=1, decoupled=False, aux=False).load_official(p2) == "phase2"
    for name in ("phase2.log", "phase2_args.json", "latest.pth"):
        assert (snap / name).is_file(), name
    assert list(snap.glob("events.out.tfevents.*")), "--tensorboard wrote no event file"
    assert [m["iter"] for m in read_metrics(snap)] == [0, 1]
    for m in read_metrics(snap):
        assert math.isfinite(m["loss_seg"]) and math.isfinite(m["loss_src_seg"]), m
    # the phase-2 network started from the phase-1 target branch
    assert "phase1 layout" in (snap / "phase2.log").read_text()


def test_readme_chain_files_have_ordinary_modes(chain) -> None:
    """Under umask 022 every file the chain writes is 0644, as a plain open() would create it (the
    atomic writes used to leave mkstemp's 0600, unreadable for a lab's other users)."""
    snaps = chain["phase1_ckpt"].parent.parent
    files = [chain["phase1_ckpt"], snaps / "GTA2Cityscapes_phase1" / "latest.pth",
             chain["phase2_snapshot"] / "GTA5_2.pth", chain["phase2_snapshot"] / "latest.pth",
             chain["phase2_snapshot"] / "phase2_args.json", chain["thresholds"],
             *snaps.glob("*/class_balance_*.json"), *chain["soft"].glob("*.npy")]
    assert len(files) >= 9
    modes = {str(p.relative_to(chain["work"])): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert np.load(chain["thresholds"]).dtype == np.float32


def test_readme_chain_tensorboard_has_the_original_tags(chain) -> None:
    """Phase 1 and phase 2 of the chain (--tensorboard, 2 iterations): the original's loss scalars
    under its tags at step 0 only (every 10 iterations), with the logged values, and no second
    copy under train/."""
    from tests.helpers import tensorboard_scalars

    snaps = chain["phase1_ckpt"].parent.parent
    for snap, tags in ((snaps / "GTA2Cityscapes_phase1",
                        ("loss_seg", "loss_adv_src", "loss_adv_tgt", "loss_D1", "loss_D2", "loss_st")),
                       (chain["phase2_snapshot"], ("loss_seg", "loss_src_seg"))):
        scalars = tensorboard_scalars(snap)
        first = read_metrics(snap)[0]
        for tag in tags:
            assert [step for step, _ in scalars.get(tag, [])] == [0], (snap.name, tag, scalars.get(tag))
            assert scalars[tag][0][1] == pytest.approx(first[tag], rel=1e-6), (snap.name, tag)
        assert not [t for t in scalars if t.startswith(("train/loss", "val/"))], sorted(scalars)
        assert {"train/total", "lr/model"} <= set(scalars), sorted(scalars)


def test_readme_chain_reports_pseudo_label_quality(chain, synthetic_data) -> None:
    """The synthetic target train images have ground truth: every stage reports against it."""
    import torch.nn.functional as F

    from datasets.cityscapes import CityscapesDataset, soft_label_name
    from tests.conftest import IMG_H, IMG_W
    from utils.metrics import intersection_and_union, mean_iou

    # phases 1 and 2: pseudo_acc on every iteration, in [0, 1], over the scored pixels
    for snap in (chain["phase1_ckpt"].parent, chain["phase2_snapshot"]):
        for m in read_metrics(snap):
            assert m["pseudo_acc_pixels"] > 0 and 0.0 <= m["pseudo_acc"] <= 1.0, (snap.name, m)
    for proc in (chain["phase1"], chain["phase2"]):
        assert "it never reaches a loss" in proc.stdout and "pseudo_acc = " in proc.stdout
    # soft labels: the logged mIoU of their argmax is the validation rule on the written files
    out = chain["generate"].stdout
    assert "soft labels (argmax) vs train ground truth" in out, out
    logged = float(re.findall(r"^mIoU\s+([0-9.]+)$", out, re.MULTILINE)[-1])
    ds = CityscapesDataset(synthetic_data["cityscapes"], "train", img_size=(IMG_W, IMG_H), train_labels=True)
    inter = union = 0
    for i, path in enumerate(ds.files):
        label = ds[i]["label"].long()
        logits = torch.from_numpy(np.load(chain["soft"] / soft_label_name(path)))[None]
        pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=True).argmax(1)[0]
        i_, u_, _ = intersection_and_union(pred, label, 19)
        inter, union = inter + i_, union + u_
    assert logged == pytest.approx(100 * mean_iou(inter, union)[1], abs=0.006)
    # thresholds: the per-class report
    report = chain["thresholds_cmd"].stdout
    assert "per-class thresholds at P=0.8" in report and re.search(r"^all\s+\d+\s+100.00%\s+[0-9.]+%$", report,
                                                                   re.MULTILINE), report


# ---------------------------------------------------------------------------- phase 2 on its own
def phase2_args(data, soft: Path, thresholds: Path, resume: Path, snapshot: Path, *extra) -> list:
    return ["train_phase2.py", *tiny_args(data), "--soft_labels_folder", soft, "--thresholds_path", thresholds,
            "--resume", resume, "--snapshot-dir", snapshot, *extra]


def test_phase2_two_process_gloo_ddp(synthetic_data, fake_soft, sourceonly_ckpt, tmp_path) -> None:
    soft, thresholds = fake_soft
    snap = tmp_path / "ddp"
    proc = run_script(phase2_args(synthetic_data, soft, thresholds, sourceonly_ckpt, snap, "--dist", "--gpus", "0,1",
                                  "--batch-size", "2", "--num-workers", "0", "--num-steps", "2",
                                  "--num-steps-stop", "2"), env=ONE_LINE_ENV)
    assert "rank 0/2" in proc.stdout
    assert set(load(snap / "GTA5_2.pth")) == PHASE2_GROUPS
    assert [m["iter"] for m in read_metrics(snap)] == [0, 1]
    # pseudo-label accuracy over both ranks: one crop of 64x32 each, thresholds 0.3 keep some
    assert all(0 < m["pseudo_acc_pixels"] <= 2 * 64 * 32 and m["pseudo_acc"] is not None for m in read_metrics(snap))


def test_phase2_resume_is_bit_identical(synthetic_data, fake_soft, sourceonly_ckpt, tmp_path) -> None:
    soft, thresholds = fake_soft
    common = ["--batch-size", "2", "--num-workers", "2", "--num-steps", "4", "--save-pred-every", "2",
              "--save_latest_every", "2", "--print-every", "1"]
    snap_a, snap_b = tmp_path / "A", tmp_path / "B"
    run_script(phase2_args(synthetic_data, soft, thresholds, sourceonly_ckpt, snap_a, *common, "--num-steps-stop", "4"))
    run_script(phase2_args(synthetic_data, soft, thresholds, sourceonly_ckpt, snap_b, *common, "--num-steps-stop", "2"))
    assert load(snap_b / "latest.pth")["iteration"] == 2
    proc = run_script(phase2_args(synthetic_data, soft, thresholds, sourceonly_ckpt, snap_b, *common,
                                  "--num-steps-stop", "4", "--resume_from", "auto"))
    assert "resumed from" in proc.stdout

    assert_same_state(load(snap_a / "GTA5_4.pth"), load(snap_b / "GTA5_4.pth"), "GTA5_4.pth")
    la, lb = load(snap_a / "latest.pth"), load(snap_b / "latest.pth")
    assert la["iteration"] == lb["iteration"] == 4
    for key in ("model", "extra_modules", "optimizers", "stage_state", "scaler", "best_miou"):
        assert_same_state(la[key], lb[key], f"latest.pth/{key}")
    assert Path(la["best_path"]).name == Path(lb["best_path"]).name
    assert read_metrics(snap_a) == read_metrics(snap_b)


# ---------------------------------------------------------------------------- soft-label interop
@pytest.fixture(scope="module")
def official_phase1_ckpt(tmp_path_factory) -> Path:
    """An official-format phase-1 file as the original writes it under DDP: ``module.`` prefixes,
    no aux classifier group, the filled layer-1 weights of tests/data/parity."""
    ckpt = filled_phase1_checkpoint(DecoupleNet(layer=1))
    ckpt.pop("aux_classifier_state_dict", None)
    assert set(ckpt) == {"model_B1_state_dict"} | PHASE2_GROUPS
    ckpt = OrderedDict((g, OrderedDict((f"module.{k}", v) for k, v in sd.items())) for g, sd in ckpt.items())
    path = tmp_path_factory.mktemp("interop") / "GTA5_official.pth"
    torch.save(ckpt, path)
    return path


def generate_args(ckpt: Path, out: Path, snapshot: Path, *extra) -> list:
    return ["generate_soft_label.py", "--cpu", "--quiet", "--tgt_img_size", "192,96", "--tgt_rootpath", TINY_CITYSCAPES,
            "--resume", ckpt, "--output_folder", out, "--snapshot-dir", snapshot, "--num-workers", "0", *extra]


def check_against_expected(out: Path, dtype, rtol: float) -> None:
    expected = np.load(Path(PARITY) / "interop_expected_logits.npz")
    train = {k[len("train/"):]: expected[k] for k in expected.files if k.startswith("train/")}
    assert sorted(os.listdir(out)) == sorted(f"{n}.npy" for n in train)
    for name, want in train.items():
        got = np.load(out / f"{name}.npy")
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
        assert err <= rtol, f"{name}: max |diff| / max |expected| = {err:.3g}"


@pytest.fixture(scope="module")
def interop_float32(official_phase1_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("interop_out")
    out = root / "soft"
    proc = run_script(generate_args(official_phase1_ckpt, out, root / "snap"))
    return out, proc


def test_generate_soft_labels_from_official_checkpoint(interop_float32) -> None:
    out, proc = interop_float32
    check_against_expected(out, np.float32, 1e-4)
    assert "soft labels: 3 files written" in proc.stdout, proc.stdout


def test_generate_soft_labels_float16(official_phase1_ckpt, tmp_path) -> None:
    out = tmp_path / "soft16"
    run_script(generate_args(official_phase1_ckpt, out, tmp_path / "snap", "--soft_label_dtype", "float16"))
    check_against_expected(out, np.float16, 1e-3)


def test_generate_soft_labels_skip_existing(interop_float32, official_phase1_ckpt, tmp_path) -> None:
    out, _ = interop_float32
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    proc = run_script(generate_args(official_phase1_ckpt, out, tmp_path / "snap", "--skip_existing"))
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before
    assert "3 of 3 soft labels already there" in proc.stdout, proc.stdout
    assert "soft labels: 0 files written" in proc.stdout, proc.stdout


def test_generate_soft_labels_two_processes(official_phase1_ckpt, tmp_path) -> None:
    out = tmp_path / "soft_ddp"
    proc = run_script(generate_args(official_phase1_ckpt, out, tmp_path / "snap", "--dist", "--gpus", "0,1",
                                    "--batch-size", "2"), env=ONE_LINE_ENV)
    # 3 images over 2 ranks: written 3 times in total (no padded duplicate), each file once.
    assert "soft labels: 3 files written" in proc.stdout, proc.stdout
    check_against_expected(out, np.float32, 1e-4)


def test_generate_soft_labels_batch_is_the_batch_size_flag(official_phase1_ckpt, tmp_path, monkeypatch) -> None:
    """The original labels the images with its target *train* loader: ``--batch-size // W``
    images per GPU (``--batch_size_val`` plays no part). The README command (``--batch-size 8
    --gpus 0,1,2,3 --batch_size_val 4``) gives 2 per GPU; a lower ``--batch-size`` lowers it."""
    import stages.soft_labels
    from stages.options import parse_args
    from utils.distributed import DistEnv

    seen: list[int] = []
    real = stages.soft_labels.shard_loader

    def recording(dataset, batch_per_rank, env, num_workers):
        loader = real(dataset, batch_per_rank, env, num_workers)
        seen.append(loader.batch_size)
        return loader

    monkeypatch.setattr(stages.soft_labels, "shard_loader", recording)
    readme = ["--batch-size", "8", "--gpus", "0,1,2,3", "--batch_size_val", "4", "--no_droplast"]
    for name, flags, env, per_gpu in (("readme", readme, DistEnv(rank=0, world_size=4), 2),
                                      ("one_rank", ["--batch-size", "3", "--batch_size_val", "1"], DistEnv(), 3),
                                      ("lowered", ["--batch-size", "1", "--batch_size_val", "4"], DistEnv(), 1)):
        argv = [str(a) for a in generate_args(official_phase1_ckpt, tmp_path / name, tmp_path / f"snap_{name}",
                                              *flags)[1:]]
        stages.soft_labels.generate_soft_labels(parse_args("soft_label", "", argv), env)
        assert seen[-1] == per_gpu, (name, seen)
    check_against_expected(tmp_path / "one_rank", np.float32, 1e-4)  # batching does not change the labels


# ---------------------------------------------------------------------------- bad phase-2 inputs
def _missing_soft(soft: Path, thr: Path, resume: Path, tmp: Path):
    victim = sorted(soft.iterdir())[1]
    victim.unlink()
    return soft, thr, resume, victim.name


def _wrong_shape_soft(soft: Path, thr: Path, resume: Path, tmp: Path):
    victim = min(soft.iterdir())
    np.save(victim, np.zeros((19, SOFT_HW[0] // 2, SOFT_HW[1]), np.float32))
    return soft, thr, resume, victim.name


def _short_thresholds(soft: Path, thr: Path, resume: Path, tmp: Path):
    np.save(thr, np.full(18, 0.3))
    return soft, thr, resume, "--thresholds_path"


def _nan_thresholds(soft: Path, thr: Path, resume: Path, tmp: Path):
    values = np.full(19, 0.3)
    values[4] = np.nan
    np.save(thr, values)
    return soft, thr, resume, "--thresholds_path"


def _resume_not_checkpoint(soft: Path, thr: Path, resume: Path, tmp: Path):
    bad = tmp / "notes.pth"
    bad.write_text("this is not a checkpoint\n")
    return soft, thr, bad, "notes.pth"


def _resume_wrong_keys(soft: Path, thr: Path, resume: Path, tmp: Path):
    bad = tmp / "foo.pth"
    torch.save({"foo": 1}, bad)
    return soft, thr, bad, "foo.pth"


@pytest.mark.parametrize("make_bad", [_missing_soft, _wrong_shape_soft, _short_thresholds, _nan_thresholds,
                                      _resume_not_checkpoint, _resume_wrong_keys],
                         ids=lambda f: f.__name__.strip("_"))
def test_phase2_bad_input_is_one_clear_line(make_bad, synthetic_data, fake_soft, sourceonly_ckpt, tmp_path) -> None:
    soft = tmp_path / "soft"
    shutil.copytree(fake_soft[0], soft)
    thr = tmp_path / "thr.npy"
    shutil.copy(fake_soft[1], thr)
    soft, thr, resume, named = make_bad(soft, thr, sourceonly_ckpt, tmp_path)
    proc = run_script(phase2_args(synthetic_data, soft, thr, resume, tmp_path / "snap", "--batch-size", "2",
                                  "--num-workers", "0", "--num-steps", "2", "--num-steps-stop", "2"), check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    if make_bad is _nan_thresholds:
        assert re.search(r"nan|non-finite", lines[0], re.IGNORECASE), lines[0]
    if make_bad is _resume_wrong_keys:
        assert "foo" in lines[0].split("foo.pth", 1)[1], lines[0]
