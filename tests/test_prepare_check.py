"""datasets.prepare (gtav_label_info.p, split.mat) and datasets.check on synthetic trees."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

SIZE = (64, 32)


def _run(*args: str) -> subprocess.CompletedProcess:
    """``python -m ARGS`` in a subprocess (the real command line, exit codes)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)


def _run_inproc(*args: str) -> subprocess.CompletedProcess:
    """The same, in this process (much faster: no interpreter + torch start per call)."""
    import contextlib
    import importlib

    module, argv = args[0], list(args[1:])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = importlib.import_module(module).main(argv)
        except SystemExit as exc:
            rc = exc.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from datasets.synthetic import generate

    out = tmp_path_factory.mktemp("prepare_check")
    generate(out / "data", seed=5, size=SIZE, num_source=8, num_target_train=3, num_target_val=3)
    return out / "data"


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    """A fresh copy of the synthetic trees that a test may break."""
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


def _check(tree: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run_inproc("datasets.check", "--src_rootpath", str(tree / "gta5"), "--tgt_rootpath", str(tree / "cityscapes"),
                "--workers", "1", *extra)


# ------------------------------------------------------------------------------------------------ prepare
def test_prepare_rebuilds_label_info_and_split_that_the_loader_uses(tree):
    from datasets.build import balanced_file_list
    from datasets.gta5 import GTA5Dataset, _split_names
    from datasets.label_info import label_info_from_folder, load_label_info

    root = tree / "gta5"
    generated = (root / "gtav_label_info.p").read_bytes()
    (root / "gtav_label_info.p").unlink()
    (root / "split.mat").unlink()

    proc = _run("datasets.prepare", "gta5", str(root), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # per-class pixel table with class names, and the warning about the all-images split
    assert "road" in proc.stdout and "bicycle" in proc.stdout and "pixels" in proc.stdout
    assert "lists every image" in proc.stderr

    # label info: same object as label_info_from_folder (and the generator's bytes)
    assert (root / "gtav_label_info.p").read_bytes() == generated
    assert load_label_info(root / "gtav_label_info.p") == label_info_from_folder(root / "labels")
    # pixel counts printed = the labels' pixels
    counts = np.zeros(19, dtype=np.int64)
    from datasets.labels import encode_labels

    for p in sorted((root / "labels").glob("*.png")):
        enc = encode_labels(np.asarray(Image.open(p)))
        counts += np.bincount(enc.reshape(-1), minlength=256)[:19]
    road_row = next(line for line in proc.stdout.splitlines() if " road " in line)
    assert f"{int(counts[0]):,d}" in road_row

    # split.mat round-trips through the loader's reader: every image, in order
    names = sorted(p.name for p in (root / "images").glob("*.png"))
    assert _split_names(str(root / "split.mat")) == names
    ds = GTA5Dataset(root, img_size=SIZE)
    assert ds.files == names
    assert ds[0]["label"].shape == (SIZE[1], SIZE[0])

    # the class-balanced list works with the rebuilt label info
    class Args:
        num_steps, batch_size, world_size, random_seed, num_classes = 5, 2, 1, 1234, 19

    listed = balanced_file_list(Args, str(root), cache_dir=None)
    assert len(listed) == 3000 and set(listed) <= set(names)
    ds = GTA5Dataset(root, img_size=SIZE, file_list=listed[:4])
    assert len(ds) == 4 and ds[3]["img"].shape == (3, SIZE[1], SIZE[0])


def test_prepare_never_overwrites_split_and_refuses_bad_roots(tree, tmp_path):
    root = tree / "gta5"
    before = (root / "split.mat").read_bytes()
    proc = _run_inproc("datasets.prepare", "gta5", str(root), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (root / "split.mat").read_bytes() == before
    assert "kept the existing" in proc.stdout

    proc = _run_inproc("datasets.prepare", "gta5", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nowhere" in proc.stderr
    (tmp_path / "empty" / "labels").mkdir(parents=True)
    proc = _run_inproc("datasets.prepare", "gta5", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no .png label" in proc.stderr
    (tmp_path / "nolabels").mkdir()
    proc = _run_inproc("datasets.prepare", "gta5", str(tmp_path / "nolabels"))
    assert proc.returncode == 2 and "labels folder not found" in proc.stderr


def test_prepare_with_workers_gives_the_same_file(tree):
    root = tree / "gta5"
    reference = (root / "gtav_label_info.p").read_bytes()
    from datasets import prepare

    prepare._CHUNK, old = 2, prepare._CHUNK  # several chunks, so the pool is used
    try:
        prepare.prepare_gta5(str(root), workers=2, quiet=True)
    finally:
        prepare._CHUNK = old
    assert (root / "gtav_label_info.p").read_bytes() == reference


# ------------------------------------------------------------------------------------------------ check
@pytest.mark.slow
def test_check_passes_on_intact_synthetic_data(tree):
    proc = _run("datasets.check", "--src_rootpath", str(tree / "gta5"), "--tgt_rootpath", str(tree / "cityscapes"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "problem:" not in proc.stdout
    assert "0 problem(s)" in proc.stdout and "all is well" in proc.stdout
    assert "8 images, 8 labels, 8 pairs" in proc.stdout
    assert "val 3 images / 3 gtFine labels" in proc.stdout


def test_check_synthia_tree(tmp_path):
    from datasets.synthetic import generate

    roots = generate(tmp_path / "d", seed=1, size=SIZE, num_source=3, num_target_train=2, num_target_val=2,
                     synthia=True)
    proc = _run_inproc("datasets.check", "--src_dataset", "synthia", "--src_rootpath", roots["synthia"],
                "--tgt_rootpath", roots["cityscapes"], "--workers", "1")
    assert proc.returncode == 0, proc.stdout
    Path(roots["synthia"], "GT", "LABELS", "0000001.png").unlink()
    proc = _run_inproc("datasets.check", "--src_dataset", "synthia", "--src_rootpath", roots["synthia"])
    assert proc.returncode == 1 and "0000001.png" in proc.stdout


def _problems(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("problem:")]


def test_check_missing_label(tree):
    (tree / "gta5" / "labels" / "00003.png").unlink()
    val_label = next((tree / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    val_label.unlink()
    proc = _check(tree)
    assert proc.returncode == 1
    problems = "\n".join(_problems(proc))
    assert str(tree / "gta5" / "labels" / "00003.png") in problems
    assert str(val_label) in problems
    # split.mat and the label info still list the missing file: named too
    assert "split.mat: lists 00003.png" in problems
    assert "gtav_label_info.p: lists 00003.png" in problems


def test_check_size_mismatch(tree):
    label = tree / "gta5" / "labels" / "00002.png"
    with Image.open(label) as im:
        im.resize((40, 40), Image.NEAREST).save(label)  # another aspect ratio
    val_label = next((tree / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    with Image.open(val_label) as im:
        im.resize((SIZE[0] // 2, SIZE[1] // 2), Image.NEAREST).save(val_label)  # same aspect: val needs exact
    proc = _check(tree)
    assert proc.returncode == 1
    problems = _problems(proc)
    assert any(str(label) in p and "40x40" in p for p in problems), proc.stdout
    assert any(str(val_label) in p and "does not match" in p for p in problems), proc.stdout


def test_check_same_aspect_gta5_size_is_only_a_warning(tree):
    label = tree / "gta5" / "labels" / "00002.png"
    with Image.open(label) as im:
        im.resize((SIZE[0] * 2, SIZE[1] * 2), Image.NEAREST).save(label)
    proc = _check(tree)
    assert proc.returncode == 0, proc.stdout
    assert any(line.startswith("warning:") and str(label) in line for line in proc.stdout.splitlines())


def test_check_extra_image(tree):
    extra = tree / "gta5" / "images" / "00099.png"
    shutil.copy(tree / "gta5" / "images" / "00001.png", extra)
    val_dir = tree / "cityscapes" / "leftImg8bit" / "val"
    src = next(val_dir.rglob("*_leftImg8bit.png"))
    extra_val = src.parent / "zzz_000000_000019_leftImg8bit.png"
    shutil.copy(src, extra_val)
    proc = _check(tree)
    assert proc.returncode == 1
    problems = "\n".join(_problems(proc))
    assert str(tree / "gta5" / "labels" / "00099.png") in problems and str(extra) in problems
    assert str(extra_val) in problems


def test_check_garbled_label_info(tree):
    info = tree / "gta5" / "gtav_label_info.p"
    info.write_bytes(info.read_bytes()[:40])
    proc = _check(tree)
    assert proc.returncode == 1
    assert any(str(info) in p for p in _problems(proc)), proc.stdout


def test_check_label_info_that_does_not_match_the_labels(tree):
    from datasets.label_info import load_label_info, save_label_info

    info = tree / "gta5" / "gtav_label_info.p"
    l2f, f2l = load_label_info(info)
    f2l["00001.png"] = [0]  # stale: claims only road
    l2f = [[n for n in names if n != "00001.png"] for names in l2f]
    l2f[0].insert(0, "00001.png")
    save_label_info(info, l2f, f2l)
    proc = _check(tree)
    assert proc.returncode == 1
    assert any("00001.png" in p and "holds" in p for p in _problems(proc)), proc.stdout


def test_check_refuses_a_crafted_pickle(tree):
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    info = tree / "gta5" / "gtav_label_info.p"
    info.write_bytes(pickle.dumps(Boom()))
    proc = _check(tree)
    assert proc.returncode == 1
    assert "pwned" not in proc.stdout
    assert any(str(info) in p and "refusing" in p for p in _problems(proc)), proc.stdout


def test_check_unknown_ids_are_warnings(tree):
    val_label = next((tree / "cityscapes" / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    arr = np.asarray(Image.open(val_label)).copy()
    arr[0, 0] = 40
    Image.fromarray(arr).save(val_label)
    proc = _check(tree)
    assert proc.returncode == 0, proc.stdout
    assert any(line.startswith("warning:") and str(val_label) in line and "40" in line
               for line in proc.stdout.splitlines())


@pytest.mark.slow
def test_check_missing_roots(tmp_path):
    proc = _run("datasets.check", "--src_rootpath", str(tmp_path / "a"), "--tgt_rootpath", str(tmp_path / "b"))
    assert proc.returncode == 1
    assert len(_problems(proc)) == 2


def test_check_gta5_label_ids_the_loader_stops_on(tree):
    """A GTA5 label id other than 0..34 and 250 is a problem (the loader, like the original's, stops on
    it); ids 34 and 250 are ignore, not a problem."""
    labels = tree / "gta5" / "labels"
    bad, fine = labels / "00002.png", labels / "00003.png"
    for path, value in ((bad, 40), (fine, 34)):
        ids = np.array(Image.open(path))
        ids[0, 0], ids[0, 1] = value, 250
        Image.fromarray(ids).save(path)
    proc = _check(tree)
    assert proc.returncode == 1
    problems = _problems(proc)
    assert [p for p in problems if str(bad) in p and "label ids 40 " in p], proc.stdout
    assert not [p for p in problems if str(fine) in p], proc.stdout
