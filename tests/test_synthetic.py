"""The synthetic data generator (datasets/synthetic.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from datasets.cityscapes import CityscapesDataset
from datasets.class_balance import class_balanced_list
from datasets.gta5 import GTA5Dataset
from datasets.label_info import load_label_info
from datasets.labels import encode_labels
from datasets.synthetic import generate, main


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".mat"
    }


@pytest.mark.slow
def test_defaults_fast_complete_deterministic(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    roots = generate(tmp_path / "a", seed=1)
    assert time.perf_counter() - t0 < 5.0
    gta = Path(roots["gta5"])
    assert len(list((gta / "images").glob("*.png"))) == 12
    assert len(list((gta / "labels").glob("*.png"))) == 12
    mat = scipy.io.loadmat(gta / "split.mat")
    ids = np.concatenate([mat[k].reshape(-1) for k in ("trainIds", "valIds", "testIds")])
    assert sorted(ids.tolist()) == list(range(1, 13))
    assert mat["trainIds"].shape[1] == 1
    # All 19 classes appear in the source labels; the label info agrees with the labels.
    l2f, f2l = load_label_info(gta / "gtav_label_info.p")
    present: set[int] = set()
    for name, classes in f2l.items():
        enc = encode_labels(np.array(Image.open(gta / "labels" / name)))
        assert sorted(set(np.unique(enc).tolist()) - {250}) == classes
        present |= set(classes)
    assert present == set(range(19))
    assert all(len(files) >= 1 for files in l2f)
    assert len(class_balanced_list(l2f, f2l, 10)) == 3000
    cs = Path(roots["cityscapes"])
    train = sorted((cs / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    val = sorted((cs / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))
    assert len(train) == 6 and len(val) == 4
    assert len({p.parent.name for p in train}) >= 2
    img = cv2.imread(str(train[0]))
    assert img.shape == (128, 256, 3)
    # Same seed -> identical files; another seed -> different ones.
    generate(tmp_path / "b", seed=1)
    generate(tmp_path / "c", seed=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_domain_shift_and_loaders(tmp_path: Path) -> None:
    roots = generate(tmp_path, seed=0, size=(96, 64), num_source=4, num_target_train=3,
                     num_target_val=2, synthia=True)
    src = GTA5Dataset(roots["gta5"], img_size=(96, 64))
    tgt = CityscapesDataset(roots["cityscapes"], "val", img_size=(96, 64))
    assert len(src) == 4 and len(tgt) == 2

    def road_colour(ds):
        means = []
        for i in range(len(ds)):
            s = ds[i]
            img = s["img"].permute(1, 2, 0).numpy().astype(np.float64)
            means.append(img[s["label"].numpy() == 0].mean(axis=0))
        return np.mean(means, axis=0)

    # Same class, clearly different appearance in the two domains.
    assert np.abs(road_colour(src) - road_colour(tgt)).max() > 10
    gt = cv2.imread(str(next((Path(roots["synthia"]) / "GT" / "LABELS").glob("*.png"))),
                    cv2.IMREAD_UNCHANGED)
    assert gt.dtype == np.uint16 and gt.ndim == 3 and gt[:, :, 2].max() <= 21


def test_cli(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path), "--size", "64,32", "--num_source", "2",
          "--num_target_train", "2", "--num_target_val", "1", "--seed", "4"])
    assert "cityscapes" in capsys.readouterr().out
    assert cv2.imread(str(tmp_path / "gta5" / "images" / "00002.png")).shape == (32, 64, 3)
    assert not (tmp_path / "synthia").exists()


def test_gap_scales_target_appearance_only(tmp_path: Path) -> None:
    """--gap: 1 is the default output; smaller values bring the target's road colour towards the
    source's; labels and source images do not change; a negative gap is refused."""
    from datasets.synthetic import target_style

    def road(images: list[Path], label_of) -> np.ndarray:  # mean colour of the road pixels
        cols = []
        for img_path in images:
            img = np.asarray(Image.open(img_path).convert("RGB"), dtype=np.float64)
            cols.append(img[encode_labels(np.asarray(Image.open(label_of(img_path)))) == 0].mean(axis=0))
        return np.mean(cols, axis=0)

    out = {}
    for gap in (1.0, 0.0, 0.5):
        main(["--out", str(tmp_path / str(gap)), "--size", "64,32", "--num_source", "2",
              "--num_target_train", "1", "--num_target_val", "2", "--gap", str(gap)])
        out[gap] = tmp_path / str(gap)
    default = tmp_path / "default"
    main(["--out", str(default), "--size", "64,32", "--num_source", "2", "--num_target_train", "1",
          "--num_target_val", "2"])
    assert _digest(out[1.0]) == _digest(default)
    assert _digest(out[0.5] / "gta5") == _digest(default / "gta5")
    assert _digest(out[0.5] / "cityscapes" / "gtFine") == _digest(default / "cityscapes" / "gtFine")
    src = road(sorted((default / "gta5" / "images").glob("*.png")),
               lambda p: p.parents[1] / "labels" / p.name)
    dist = {}
    for gap, root in out.items():
        cs = root / "cityscapes"
        tgt = road(sorted((cs / "leftImg8bit" / "val").glob("*/*.png")),
                   lambda p, cs=cs: cs / "gtFine" / "val" / p.parent.name /
                   p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
        dist[gap] = float(np.abs(tgt - src).max())
    assert dist[0.0] < dist[0.5] < dist[1.0], dist
    with pytest.raises(ValueError):
        target_style(-0.5)


def test_gap_kind_filter_keeps_palette_and_changes_filter_level_appearance(tmp_path: Path) -> None:
    """--gap_kind filter / texture: opt-in (the default output is unchanged); the target keeps the
    source's palette (similar mean road colour) but is noisier and blurred with lighting that varies
    inside the image; texture also changes each class's stripes, and nothing else (same scenes and labels)."""
    from datasets.synthetic import source_style, target_style

    args = ["--size", "64,32", "--num_source", "2", "--num_target_train", "1", "--num_target_val", "2"]
    for kind in ("colour", "filter", "texture"):
        main(["--out", str(tmp_path / kind), "--gap_kind", kind, *args])
    main(["--out", str(tmp_path / "default"), *args])
    assert _digest(tmp_path / "colour") == _digest(tmp_path / "default")
    cs = {k: tmp_path / k / "cityscapes" for k in ("filter", "texture")}
    assert _digest(cs["filter"] / "gtFine") == _digest(cs["texture"] / "gtFine")
    assert _digest(cs["filter"] / "leftImg8bit") != _digest(cs["texture"] / "leftImg8bit")
    assert _digest(tmp_path / "filter" / "gta5") == _digest(tmp_path / "texture" / "gta5")
    s, t = source_style("filter"), target_style(1.0, "filter")
    assert s.offset == t.offset and s.gain == t.gain and s.contrast == t.contrast and s.gamma == t.gamma
    assert t.noise > s.noise and t.blur > s.blur and t.shading > s.shading == 0 and t.pattern == s.pattern > 0
    assert t.pattern_mix == 0 and target_style(1.0, "texture").pattern_mix == 1
    assert target_style(0.0, "filter") == s
    half = target_style(0.5, "filter")
    assert s.noise < half.noise < t.noise and 0 < half.shading < t.shading
    with pytest.raises(ValueError):
        source_style("weather")
