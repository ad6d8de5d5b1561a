"""Bad inputs through the real scripts: exit code 2, one stderr line naming the file or flag and
the problem, no traceback (unless ``--debug``), and nothing written before is touched.

Every case gets its own copy of the synthetic data and a snapshot folder that already holds a
``latest.pth`` and a best checkpoint from "an earlier run"; those must be byte-identical after the
failed run. The cases run a few at a time (module fixture), the tests check one outcome each.
Runs are real processes forked from the pre-loaded script server (tests/reliability/zygote.py);
the ``--dist`` case, which spawns ranks, is a plain ``python train_phase1.py`` (it also shows
that a fresh interpreter prints nothing else to stderr).

Decisions recorded here:
* a missing ``split.mat`` is an error, as in the original (the GTA5 loader always reads it,
  even though the training order is the class-balanced list of ``gtav_label_info.p``).
* label ids above 33 in a Cityscapes label are valid and ignored (``evaluate.py`` succeeds);
  what the label reader rejects is a label PNG that is not single-channel (RGB).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.build import balanced_file_list
from datasets.sampler import StreamSampler
from model import DecoupleNet
from stages.options import DEFAULTS, parse_args
from tests.conftest import IMG_H, IMG_W, target_train_basenames, tiny_args
from tests.helpers import REPO, miou_by_hand
from tests.reliability.conftest import copy_data, phase1_argv, phase2_argv
from tests.reliability.runner import BASE_ENV, Result, digest, one_error_line, temp_files

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

P1_STEPS = ["--batch-size", "1", "--num-steps", "2", "--num-steps-stop", "1"]


@dataclass
class Ctx:
    """What a case's ``prepare`` gets: its folder, a private data copy, the shared inputs."""

    folder: Path
    data: dict[str, Path]
    ckpt: Path
    soft: Path
    thresholds: Path
    snap: Path = field(init=False)

    def __post_init__(self) -> None:
        self.snap = self.folder / "snap"

    def phase1(self, *extra: object) -> list:
        return phase1_argv(self.data, self.ckpt, self.snap, *P1_STEPS, *extra)

    def phase2(self, *extra: object, soft: Path | None = None, thresholds: Path | None = None) -> list:
        return phase2_argv(self.data, soft or self.soft, thresholds or self.thresholds, self.ckpt, self.snap,
                           *P1_STEPS, *extra)

    def first_source_name(self) -> str:
        """The GTA5 file of the first training sample (class-balanced list + sample stream)."""
        args = parse_args("phase1", "", [str(a) for a in self.phase1()[1:]])
        args.world_size = 1
        names = balanced_file_list(args, str(self.data["gta5"]), None)
        _, index = next(iter(StreamSampler(len(names), 1, 1, 0, seed=args.random_seed, shuffle=not args.noshuffle)))
        return names[index]

    def copy_soft(self) -> Path:
        return Path(shutil.copytree(self.soft, self.folder / "soft"))


@dataclass
class Case:
    prepare: Callable[[Ctx], tuple[list, dict]]  # -> (argv, extra env)
    needles: Callable[[Ctx], list[str]]  # substrings of the one error line
    plain_process: bool = False  # a plain `python script` (needed where the script spawns processes)


def _corrupt_first_image(c: Ctx) -> Path:
    path = c.data["gta5"] / "images" / c.first_source_name()
    path.write_bytes(path.read_bytes()[:300])  # a truncated PNG (interrupted download)
    return path


def _remove_first_label(c: Ctx) -> tuple[list, dict]:
    (c.data["gta5"] / "labels" / c.first_source_name()).unlink()  # 6 images, 5 labels
    return c.phase1(), {}


def _remove_label_info(c: Ctx) -> tuple[list, dict]:
    (c.data["gta5"] / "gtav_label_info.p").unlink()
    return c.phase1(), {}


def _garble_label_info(c: Ctx) -> tuple[list, dict]:
    path = c.data["gta5"] / "gtav_label_info.p"
    path.write_bytes(path.read_bytes()[:40] + b"\xff\x00garbage")
    return c.phase1(), {}


def _corrupt_png(*extra: str) -> Callable[[Ctx], tuple[list, dict]]:
    def prepare(c: Ctx) -> tuple[list, dict]:
        _corrupt_first_image(c)
        return c.phase1(*extra), {}
    return prepare


def _skip_bad_images(c: Ctx) -> tuple[list, dict]:
    _corrupt_first_image(c)
    return c.phase1("--skip_bad_images"), {}


def _missing_split(c: Ctx) -> tuple[list, dict]:
    (c.data["gta5"] / "split.mat").unlink()
    return c.phase1(), {}


def _high_ids(c: Ctx) -> tuple[list, dict]:
    for path in (c.data["cityscapes"] / "gtFine" / "val").rglob("*_labelIds.png"):
        with Image.open(path) as im:
            label = np.array(im)
        label[: IMG_H // 4] = 200  # a label id no table knows: ignored
        Image.fromarray(label).save(path)
    return ["evaluate.py", "--cpu", "--quiet", "--tgt_rootpath", c.data["cityscapes"], "--tgt_img_size",
            f"{IMG_W},{IMG_H}", "--resume", c.ckpt, "--snapshot-dir", c.snap, "--num-workers", "0",
            "--batch_size_val", "1", "--save_dir", c.folder / "preds"], {}


def _full_disk(c: Ctx) -> tuple[list, dict]:
    argv = phase1_argv(c.data, c.ckpt, c.snap, "--batch-size", "1", "--num-steps", "2", "--num-steps-stop", "2",
                       "--save_latest_every", "1")
    return argv, {"DECOUPLENET_FAULT": "enospc:latest.pth:2"}  # the second latest.pth write fails


def _label_size(c: Ctx) -> tuple[list, dict]:
    path = c.data["gta5"] / "labels" / c.first_source_name()
    with Image.open(path) as im:  # a palette PNG of label ids
        im.resize((IMG_H, IMG_H), Image.NEAREST).save(path)  # 64x64 for a 128x64 image
    return c.phase1(), {}


def _label_rgb(c: Ctx) -> tuple[list, dict]:
    path = c.data["gta5"] / "labels" / c.first_source_name()
    with Image.open(path) as im:
        im.convert("RGB").save(path)  # the colour visualisation instead of the ids
    return c.phase1(), {}


def _empty_city(c: Ctx) -> tuple[list, dict]:
    for p in (c.data["cityscapes"] / "leftImg8bit" / "train").rglob("*.png"):
        p.unlink()
    return c.phase1(), {}


def _wrong_keys(c: Ctx) -> tuple[list, dict]:
    ck = torch.load(c.ckpt, map_location="cpu", weights_only=True, mmap=True)
    head = ck["head_state_dict"]
    first = next(iter(head))
    ck["head_state_dict"] = {("renamed_" + k if k == first else k): v for k, v in head.items()}
    path = c.folder / "renamed_key.pth"
    torch.save(ck, path)
    return phase1_argv(c.data, path, c.snap, *P1_STEPS), {}


def _layer2(c: Ctx) -> tuple[list, dict]:
    path = c.folder / "phase1_layer1.pth"
    torch.save(DecoupleNet(layer=1).official_state(phase=1), path)
    return phase1_argv(c.data, path, c.snap, *P1_STEPS, "--layer", "2"), {}


def _not_checkpoint(c: Ctx) -> tuple[list, dict]:
    path = c.folder / "notes.pth"
    path.write_text("these are my notes, not a checkpoint\n")
    return phase1_argv(c.data, path, c.snap, *P1_STEPS), {}


def _under_file(c: Ctx) -> tuple[list, dict]:
    (c.folder / "a_file").write_text("a regular file\n")
    return phase1_argv(c.data, c.ckpt, c.folder / "a_file" / "snap", *P1_STEPS), {}


def _missing_soft(c: Ctx) -> tuple[list, dict]:
    soft = c.copy_soft()
    (soft / f"{target_train_basenames(c.data)[1]}.npy").unlink()
    return c.phase2(soft=soft), {}


def _soft_shape(c: Ctx) -> tuple[list, dict]:
    soft = c.copy_soft()
    np.save(soft / f"{target_train_basenames(c.data)[1]}.npy", np.zeros((19, 4, 4), np.float32))
    return c.phase2(soft=soft), {}


def _thresholds(values: np.ndarray) -> Callable[[Ctx], tuple[list, dict]]:
    def prepare(c: Ctx) -> tuple[list, dict]:
        path = c.folder / "thresholds.npy"
        np.save(path, values)
        return c.phase2(thresholds=path), {}
    return prepare


def _missing_resume(script: str) -> Callable[[Ctx], tuple[list, dict]]:
    """``--resume`` names a file that does not exist (a typo): one line, before anything is written."""
    def prepare(c: Ctx) -> tuple[list, dict]:
        missing = c.folder / "GTA5_typo.pth"
        if script == "phase1":
            return c.phase1("--resume", missing), {}
        if script == "phase2":
            return c.phase2("--resume", missing), {}
        out = ["--output_folder", c.folder / "soft_out"] if script == "generate_soft_label.py" else []
        return [script, "--cpu", "--quiet", "--tgt_rootpath", c.data["cityscapes"], "--tgt_img_size",
                f"{IMG_W},{IMG_H}", "--resume", missing, "--snapshot-dir", c.snap, "--num-workers", "0", *out], {}
    return prepare


def _second_soft(c: Ctx) -> str:
    return str(c.folder / "soft" / f"{target_train_basenames(c.data)[1]}.npy")


def _first(kind: str) -> Callable[[Ctx], list[str]]:
    return lambda c: [str(c.data["gta5"] / kind / c.first_source_name())]


CASES: dict[str, Case] = {
    "missing_src_root": Case(lambda c: (c.phase1("--src_rootpath", c.folder / "nowhere"), {}),
                             lambda c: ["--src_rootpath", str(c.folder / "nowhere"), "not found"]),
    "missing_tgt_root": Case(lambda c: (c.phase1("--tgt_rootpath", c.folder / "nowhere"), {}),
                             lambda c: ["--tgt_rootpath", str(c.folder / "nowhere"), "not found"]),
    "empty_cityscapes_images": Case(_empty_city, lambda c: [
        str(c.data["cityscapes"] / "leftImg8bit" / "train"), "no .png image"]),
    "gta5_label_count_differs": Case(_remove_first_label, lambda c: _first("labels")(c) + ["label not found"]),
    "missing_label_info": Case(_remove_label_info, lambda c: [str(c.data["gta5"] / "gtav_label_info.p"), "not found"]),
    "garbled_label_info": Case(_garble_label_info, lambda c: [str(c.data["gta5"] / "gtav_label_info.p"), "pickle"]),
    "corrupt_png": Case(_corrupt_png(), lambda c: _first("images")(c) + ["cannot read image"]),
    "corrupt_png_in_loader_worker": Case(_corrupt_png("--num-workers", "2"),
                                         lambda c: _first("images")(c) + ["cannot read image"]),
    "image_label_size_differ": Case(_label_size, lambda c: _first("labels")(c) + ["does not match image"]),
    "rgb_label": Case(_label_rgb, lambda c: _first("labels")(c) + ["single-channel", "RGB"]),
    "missing_soft_label": Case(_missing_soft, lambda c: [_second_soft(c), "not found"]),
    "soft_label_wrong_shape": Case(_soft_shape, lambda c: [_second_soft(c), "4x4", f"{(IMG_H + 7) // 8}x{(IMG_W + 7) // 8}"]),
    "thresholds_wrong_length": Case(_thresholds(np.full(18, 0.3)),
                                    lambda c: ["--thresholds_path", str(c.folder / "thresholds.npy"), "expected 19 values"]),
    "thresholds_nan": Case(_thresholds(np.array([0.3] * 18 + [np.nan])),
                           lambda c: ["--thresholds_path", str(c.folder / "thresholds.npy"), "non-finite"]),
    "checkpoint_wrong_keys": Case(_wrong_keys, lambda c: [str(c.folder / "renamed_key.pth"), "head/"]),
    "checkpoint_wrong_shapes": Case(lambda c: (c.phase1("--num-classes", "16"), {}),
                                    lambda c: [str(c.ckpt), "shape mismatch", "classifier"]),
    "checkpoint_wrong_layer": Case(_layer2, lambda c: [str(c.folder / "phase1_layer1.pth"), "model_B2/"]),
    "resume_missing_phase1": Case(_missing_resume("phase1"),
                                  lambda c: ["--resume", str(c.folder / "GTA5_typo.pth"), "file not found"]),
    "resume_missing_phase2": Case(_missing_resume("phase2"),
                                  lambda c: ["--resume", str(c.folder / "GTA5_typo.pth"), "file not found"]),
    "resume_missing_soft_labels": Case(_missing_resume("generate_soft_label.py"),
                                       lambda c: ["--resume", str(c.folder / "GTA5_typo.pth"), "file not found"]),
    "resume_missing_evaluate": Case(_missing_resume("evaluate.py"),
                                    lambda c: ["--resume", str(c.folder / "GTA5_typo.pth"), "file not found"]),
    "not_a_checkpoint": Case(_not_checkpoint, lambda c: [str(c.folder / "notes.pth"), "not a loadable checkpoint"]),
    "batch_not_divisible_by_world_size": Case(
        lambda c: (c.phase1("--dist", "--gpus", "0,1", "--batch-size", "3"), {}),
        lambda c: ["--batch-size 3", "world size 2"], plain_process=True),
    "snapshot_dir_under_a_file": Case(_under_file, lambda c: ["--snapshot-dir", "Not a directory"]),
    "missing_split_mat": Case(_missing_split, lambda c: [str(c.data["gta5"] / "split.mat"), "not found"]),
    "full_disk_while_saving": Case(_full_disk, lambda c: [str(c.snap / "latest.pth"), "No space left on device"]),
}
# Runs that are not failures of their own case list.
EXTRA: dict[str, Case] = {
    "debug_traceback": Case(lambda c: (c.phase1("--src_rootpath", c.folder / "nowhere", "--debug"), {}), lambda c: []),
    "skip_bad_images": Case(_skip_bad_images, lambda c: []),
    "val_label_ids_above_33": Case(_high_ids, lambda c: []),
}
NO_SENTINEL_LATEST = {"full_disk_while_saving"}  # that run writes its own latest.pth first


def sentinels(snap: Path, with_latest: bool) -> dict[str, str]:
    """Files an earlier run left in the snapshot folder; returns name -> sha256."""
    snap.mkdir(parents=True)
    names = ["GTA5_1_0.5.pth"] + (["latest.pth"] if with_latest else [])
    for name in names:
        torch.save({"sentinel": torch.arange(4), "name": name}, snap / name)
    return {name: digest(snap / name) for name in names}


@pytest.fixture(scope="module")
def outcomes(scripts, synthetic_data, sourceonly_ckpt, fake_soft, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    ctxs, before, runs, names, popen = {}, {}, [], [], {}
    for name, case in {**CASES, **EXTRA}.items():
        folder = root / name
        folder.mkdir()
        c = Ctx(folder, copy_data(synthetic_data, folder / "data"), Path(sourceonly_ckpt), *fake_soft)
        argv, env = case.prepare(c)
        ctxs[name] = c
        if name == "snapshot_dir_under_a_file":
            before[name] = {"a_file": digest(folder / "a_file")}
        else:
            before[name] = sentinels(c.snap, with_latest=name not in NO_SENTINEL_LATEST)
        if case.plain_process:  # started now, collected at the end
            popen[name] = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           env={**os.environ, **BASE_ENV})
        else:
            runs.append((argv, env))
            names.append(name)
    results = dict(zip(names, scripts.run_many(runs, parallel=3)))
    for name, proc in popen.items():
        out, err = proc.communicate(timeout=300)
        results[name] = Result(proc.args, proc.returncode, out, err)
    yield {name: (results[name], ctxs[name], before[name]) for name in results}
    shutil.rmtree(root, ignore_errors=True)


def check_untouched(c: Ctx, before: dict[str, str]) -> None:
    base = c.folder if "a_file" in before else c.snap
    for name, sha in before.items():
        assert (base / name).is_file() and digest(base / name) == sha, f"{name} was changed by the failed run"
    if c.snap.is_dir():
        assert temp_files(c.snap) == [], temp_files(c.snap)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line(name, outcomes) -> None:
    result, c, before = outcomes[name]
    one_error_line(result, *CASES[name].needles(c))
    check_untouched(c, before)


def test_at_least_fifteen_cases() -> None:
    assert len(CASES) >= 15


def test_full_disk_keeps_the_previous_latest(outcomes) -> None:
    result, c, _ = outcomes["full_disk_while_saving"]
    assert result.returncode == 2, result.describe()
    state = torch.load(c.snap / "latest.pth", map_location="cpu", weights_only=True, mmap=True)
    assert state["iteration"] == 1  # the first save; the second hit the full disk
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_debug_shows_the_traceback(outcomes) -> None:
    result, c, before = outcomes["debug_traceback"]
    assert result.returncode not in (0, 2), result.describe()
    assert "Traceback" in result.stderr and "DatasetError" in result.stderr, result.describe()
    assert "--src_rootpath" in result.stderr.splitlines()[-1], result.describe()
    check_untouched(c, before)


def test_skip_bad_images_proceeds_with_a_warning(outcomes) -> None:
    result, c, _ = outcomes["skip_bad_images"]
    assert result.returncode == 0, result.describe()
    bad = str(c.data["gta5"] / "images" / c.first_source_name())
    assert "skipping unreadable sample" in result.stderr and bad in result.stderr, result.describe()
    assert (c.snap / "GTA5_1.pth").is_file()


def test_val_label_ids_above_33_are_ignored(outcomes) -> None:
    result, c, _ = outcomes["val_label_ids_above_33"]
    assert result.returncode == 0, result.describe()
    got = json.loads((c.snap / "results.json").read_text())
    label_ids, preds = [], []
    for path in sorted((c.data["cityscapes"] / "gtFine" / "val").rglob("*_labelIds.png")):
        label_ids.append(np.array(Image.open(path)))
        name = path.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png")
        preds.append(np.array(Image.open(c.folder / "preds" / "trainid" / name)))
    assert len(label_ids) == got["images"] >= 1 and all((ids == 200).any() for ids in label_ids)
    assert got["miou"] == pytest.approx(miou_by_hand(label_ids, preds), abs=1e-9)
    # The id-200 pixels matter: read as road (id 7) they would give another mIoU.
    as_road = [np.where(ids == 200, 7, ids) for ids in label_ids]
    assert abs(miou_by_hand(as_road, preds) - got["miou"]) > 1e-4


# ---------------------------------------------------------------------------- the default start point
START_SCRIPTS = {"phase1": "train_phase1.py", "phase2": "train_phase2.py", "soft_label": "generate_soft_label.py"}


@pytest.mark.parametrize("stage", [s for s in START_SCRIPTS if DEFAULTS[s]["resume"]])
def test_missing_default_resume_is_one_line(stage, scripts, synthetic_data, tmp_path) -> None:
    """Without ``--resume`` a script starts from its default file (``./pretrained/...``, relative to
    the working directory, as the original); a missing one is one line naming the flag and the
    file, before anything is written (never a silent start from ImageNet weights)."""
    argv = [os.path.join(REPO, START_SCRIPTS[stage]), *tiny_args(synthetic_data), "--snapshot-dir", tmp_path / "snap",
            "--num-workers", "0", "--output_folder", tmp_path / "soft"]
    result = scripts.run(argv, cwd=tmp_path, expect=None)
    one_error_line(result, "--resume", DEFAULTS[stage]["resume"], "file not found")
    assert sorted(os.listdir(tmp_path)) == []


def test_explicitly_empty_resume_starts_from_imagenet(scripts, synthetic_data, sourceonly_ckpt, fake_soft,
                                                      tmp_path) -> None:
    """``--resume ''`` keeps the original's start without ``--resume``: the ImageNet file."""
    argv = phase2_argv(synthetic_data, *fake_soft, "", tmp_path / "snap", *P1_STEPS)
    result = scripts.run([os.path.join(REPO, argv[0]), *argv[1:]], cwd=tmp_path, expect=None)
    one_error_line(result, os.path.join("pretrained", "resnet101-5d3b4d8f.pth"), "ImageNet")
