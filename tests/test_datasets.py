"""Loaders, joint augmentation and samplers (docs/METHOD.md section 1, docs/DESIGN.md)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.cityscapes import CityscapesDataset
from datasets.errors import DatasetError
from datasets.gta5 import GTA5Dataset, sample_rngs
from datasets.sampler import ShardSampler, StreamSampler
from datasets.synthetic import generate
from datasets.synthia import SynthiaDataset
from datasets.transforms import JointAugment

PARITY = Path(__file__).parent / "data" / "parity"
SIZE = (128, 64)  # W, H of the synthetic images


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, seed=3, size=SIZE, num_source=6, num_target_train=4,
                    num_target_val=3, synthia=True)


def _copy_tree(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _equal_samples(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[k]), k
        else:
            assert value == b[k], k


# ---- samplers ----------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_sampler_resume(shuffle: bool) -> None:
    n, b, world = 7, 2, 3
    for rank in range(world):
        fresh = _take(iter(StreamSampler(n, b, world, rank, seed=5, shuffle=shuffle)), 40 * b)
        for k in (1, 4, 9):
            resumed = _take(iter(StreamSampler(n, b, world, rank, seed=5, shuffle=shuffle,
                                               start_iter=k)), (40 - k) * b)
            assert resumed == fresh[k * b:]


def test_stream_sampler_positions() -> None:
    n, b, world = 5, 2, 2
    streams = [_take(iter(StreamSampler(n, b, world, r, seed=1)), 4 * b) for r in range(world)]
    # Interleave rank batches back into the global stream: each epoch is a permutation.
    glob = []
    for it in range(4):
        for r in range(world):
            glob.extend(streams[r][it * b:(it + 1) * b])
    epochs: dict[int, list[int]] = {}
    for e, i in glob:
        epochs.setdefault(e, []).append(i)
    assert sorted(epochs[0]) == list(range(n)) and sorted(epochs[1]) == list(range(n))
    assert epochs[0] != epochs[1] or epochs[0] != list(range(n))
    plain = _take(iter(StreamSampler(n, 1, 1, 0, shuffle=False)), 12)
    assert plain == [(p // n, p % n) for p in range(12)]


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (0, 2), (9, 1)])
def test_shard_sampler_covers_once(n: int, world: int) -> None:
    seen = []
    for r in range(world):
        s = ShardSampler(n, world, r)
        idx = list(s)
        assert len(s) == len(idx)
        assert idx == list(range(r, n, world))
        seen.extend(idx)
    assert sorted(seen) == list(range(n))


def test_sampler_argument_checks() -> None:
    with pytest.raises(ValueError):
        StreamSampler(0, 1)
    with pytest.raises(ValueError):
        StreamSampler(3, 1, world_size=2, rank=2)
    with pytest.raises(ValueError):
        ShardSampler(3, 2, -1)


# ---- joint augmentation -------------------------------------------------------------


def _image(h: int = 60, w: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    lbl = (np.arange(w)[None, :] // 5 + np.arange(h)[:, None] // 7).astype(np.uint8) % 19
    return img, lbl


def test_augment_params_and_determinism() -> None:
    img, lbl = _image()
    aug = JointAugment(resize=100, crop_wh=(40, 24), hflip=True)
    seen_flip = set()
    for i in range(20):
        rng, gen = sample_rngs(1, "source", 0, i)
        out, olbl, p = aug(img, lbl, rng, gen)
        rng2, gen2 = sample_rngs(1, "source", 0, i)
        out2, olbl2, p2 = aug(img, lbl, rng2, gen2)
        assert torch.equal(out, out2) and torch.equal(olbl, olbl2) and p == p2
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 40) and out.is_contiguous()
        assert olbl.dtype == torch.uint8 and olbl.shape == (24, 40)
        h, w = p["resized_hw"]
        ys, ye, xs, xe = p["crop_box"]
        assert (ye - ys, xe - xs) == (24, 40) and 0 <= ys and ye <= h and 0 <= xs and xe <= w
        assert 50 <= w <= 150 and h == int(w / (100 / 60))
        # The label crop is the nearest-resized label, cropped and flipped.
        ref = cv2.resize(lbl, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)[ys:ye, xs:xe]
        if p["flip"]:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(olbl.numpy(), ref)
        seen_flip.add(p["flip"])
    assert seen_flip == {True, False}


def test_augment_draw_order() -> None:
    """Draws follow docs/METHOD.md section 1: uniform, randint x, randint y, random (flip)."""
    img, lbl = _image()
    aug = JointAugment(resize=100, crop_wh=(40, 24))
    _, _, p = aug(img, lbl, random.Random(42), torch.Generator().manual_seed(0))
    r = random.Random(42)
    w = int(r.uniform(0.5, 1.5) * 100)
    h = int(w / (100 / 60))
    x1 = r.randint(0, w - 40)
    y1 = r.randint(0, h - 24)
    flip = r.random() < 0.5
    assert p == {"resized_hw": (h, w), "crop_box": (y1, y1 + 24, x1, x1 + 40), "flip": flip}


def test_crop_larger_than_resized_image() -> None:
    img, lbl = _image(60, 100)
    aug = JointAugment(resize=20, crop_wh=(90, 80))  # resized width 10..30, crop 90x80
    for i in range(10):
        out, olbl, p = aug(img, lbl, random.Random(i), torch.Generator().manual_seed(i))
        h, w = p["resized_hw"]
        assert h >= 80 and w >= 90
        assert abs(w / h - 100 / 60) < 0.05
        assert out.shape == (3, 80, 90) and olbl.shape == (80, 90)


def test_noaug_whole_image() -> None:
    img, lbl = _image()
    aug = JointAugment(resize=100, crop_wh=(40, 24), enabled=False)
    out, olbl, p = aug(img, lbl, random.Random(0), torch.Generator())
    assert p == {"resized_hw": (60, 100), "crop_box": (0, 60, 0, 100), "flip": False}
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), img)
    np.testing.assert_array_equal(olbl.numpy(), lbl)
    out2, none_lbl, _ = aug(img, None, random.Random(0), torch.Generator())
    assert none_lbl is None and torch.equal(out, out2)


def test_colour_jitter() -> None:
    img, lbl = _image()
    plain = JointAugment(resize=100, crop_wh=(40, 24))
    jit = JointAugment(resize=100, crop_wh=(40, 24), clrjit=(0.5, 0.5, 0.5, 0.2))
    a, la, pa = plain(img, lbl, random.Random(3), torch.Generator().manual_seed(1))
    b, lb, pb = jit(img, lbl, random.Random(3), torch.Generator().manual_seed(1))
    c, _, _ = jit(img, lbl, random.Random(3), torch.Generator().manual_seed(1))
    assert pa == pb and torch.equal(la, lb)  # geometry unaffected
    assert not torch.equal(a, b) and torch.equal(b, c) and b.dtype == torch.uint8
    # torchvision's ColorJitter on the PIL image, drawing from the same generator state.
    from PIL import Image
    from torchvision.transforms import ColorJitter

    crop = Image.fromarray(a.permute(1, 2, 0).numpy())
    for seed in range(6):
        ours = jit.color_jitter(crop, torch.Generator().manual_seed(seed))
        state = torch.get_rng_state()
        torch.set_rng_state(torch.Generator().manual_seed(seed).get_state())
        ref = ColorJitter(0.5, 0.5, 0.5, 0.2)(crop)
        torch.set_rng_state(state)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    assert plain.color_jitter(crop, torch.Generator()) is crop  # off: no draw, no change


# ---- GTA5 --------------------------------------------------------------------------


def test_gta5_samples(synth: dict[str, str]) -> None:
    aug = JointAugment(resize=100, crop_wh=(48, 32))
    ds = GTA5Dataset(synth["gta5"], img_size=SIZE, augment=aug, seed=7)
    assert len(ds) == 6
    s = ds[(2, 3)]
    assert s["img"].shape == (3, 32, 48) and s["img"].dtype == torch.uint8
    assert s["label"].shape == (32, 48) and s["label"].dtype == torch.uint8
    assert s["resized_hw"].dtype == torch.int64 and s["resized_hw"].shape == (2,)
    assert s["crop_box"].dtype == torch.int64 and s["crop_box"].shape == (4,)
    assert s["flip"].dtype == torch.bool
    assert s["path"].endswith("00004.png") and s["index"] == 3
    labels = set(torch.unique(s["label"]).tolist())
    assert labels <= set(range(19)) | {250}
    _equal_samples(ds[(2, 3)], s)
    _equal_samples(ds[3], ds[(0, 3)])
    assert not torch.equal(ds[(0, 3)]["img"], s["img"]) or ds[(0, 3)]["crop_box"].tolist() != \
        s["crop_box"].tolist()
    whole = GTA5Dataset(synth["gta5"], img_size=(100, 50), augment=None)[0]
    assert whole["img"].shape == (3, 50, 100) and whole["label"].shape == (50, 100)
    assert whole["crop_box"].tolist() == [0, 50, 0, 100] and not whole["flip"]
    with pytest.raises(IndexError):
        ds[6]


def test_gta5_file_list_order(synth: dict[str, str]) -> None:
    ds = GTA5Dataset(synth["gta5"], img_size=SIZE, file_list=["00002.png", "00001.png",
                                                              "00002.png"])
    assert len(ds) == 3 and ds[0]["path"].endswith("00002.png")
    assert ds[1]["path"].endswith("00001.png")
    with pytest.raises(DatasetError, match="00099.png"):
        GTA5Dataset(synth["gta5"], file_list=["00099.png"])


def test_workers_give_same_batches(synth: dict[str, str]) -> None:
    aug = JointAugment(resize=100, crop_wh=(48, 32), clrjit=(0.3, 0.3, 0.3, 0.1))
    ds = GTA5Dataset(synth["gta5"], img_size=SIZE, augment=aug, seed=1)

    def batches(workers: int) -> list[dict]:
        sampler = StreamSampler(len(ds), 2, 1, 0, seed=1)
        dl = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers)
        it = iter(dl)
        return [next(it) for _ in range(4)]

    for a, b in zip(batches(0), batches(2), strict=True):
        for k in ("img", "label", "resized_hw", "crop_box", "flip"):
            assert torch.equal(a[k], b[k])
        assert a["path"] == b["path"]


def test_gta5_errors(synth: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        GTA5Dataset(tmp_path / "nowhere")
    root = Path(_copy_tree(synth["gta5"], tmp_path / "g"))
    os.remove(root / "split.mat")
    with pytest.raises(DatasetError, match="split.mat"):
        GTA5Dataset(root)
    with pytest.raises(DatasetError, match="split.mat"):  # required as in the original, list or not
        GTA5Dataset(root, file_list=["00001.png"])
    shutil.copy(Path(synth["gta5"]) / "split.mat", root / "split.mat")
    (root / "images" / "00002.png").write_bytes(b"garbage")
    ds = GTA5Dataset(root, img_size=SIZE, file_list=["00001.png", "00002.png", "00003.png"])
    with pytest.raises(DatasetError, match="00002.png"):
        ds[1]
    skipping = GTA5Dataset(root, img_size=SIZE, file_list=["00001.png", "00002.png",
                                                           "00003.png"], skip_bad_images=True)
    with pytest.warns(UserWarning, match="00002.png"):
        s = skipping[1]
    assert s["path"].endswith("00003.png") and s["index"] == 2
    # Image and label of different frames.
    lbl = cv2.imread(str(root / "images" / "00003.png"))
    cv2.imwrite(str(root / "images" / "00003.png"), cv2.resize(lbl, (SIZE[0], SIZE[0])))
    with pytest.raises(DatasetError, match="00003.png"):
        ds[2]
    shutil.rmtree(root / "labels")
    with pytest.raises(DatasetError, match="labels"):
        GTA5Dataset(root, file_list=["00001.png"])


# ---- Cityscapes --------------------------------------------------------------------


def test_gta5_label_ids_follow_the_original_loader(synth: dict[str, str], tmp_path: Path) -> None:
    """GTA5 label ids against the original's GTA5 loader (tests/data/gta5_encoding_original.json,
    made by running its encode_segmap and transform on every uint8 id): the ids it accepts
    (0..34, 250) encode to its train ids, in the whole image and in augmented crops; every other
    id stops the sample with one error naming the label file (the original raises ValueError)."""
    import json

    from PIL import Image

    from datasets.labels import GTA5_LABEL_IDS, unknown_gta5_ids

    oracle = json.loads((Path(__file__).parent / "data" / "gta5_encoding_original.json").read_text())
    table = {int(k): v for k, v in oracle["encoded"].items()}
    assert sorted(table) == list(GTA5_LABEL_IDS)
    assert unknown_gta5_ids(np.arange(256, dtype=np.uint8)) == oracle["rejected"]
    assert unknown_gta5_ids(np.arange(256, dtype=np.int64)) == oracle["rejected"]

    root = Path(_copy_tree(synth["gta5"], tmp_path / "g"))
    label_file = root / "labels" / "00001.png"
    g = np.random.default_rng(0)
    ids = g.choice(np.array(sorted(table), dtype=np.uint8), size=(SIZE[1], SIZE[0]))
    mixed = np.array(oracle["mixed_ids"], dtype=np.uint8)
    ids[: mixed.shape[0], : mixed.shape[1]] = mixed
    Image.fromarray(ids).save(label_file)
    want = np.vectorize(table.get)(ids).astype(np.uint8)
    np.testing.assert_array_equal(want[: mixed.shape[0], : mixed.shape[1]], oracle["mixed_encoded"])

    whole = GTA5Dataset(str(root), img_size=SIZE, augment=None, file_list=["00001.png"])
    np.testing.assert_array_equal(whole[0]["label"].numpy(), want)
    aug = JointAugment(resize=SIZE[0], crop_wh=(64, 32), hflip=0.0)
    cropped = GTA5Dataset(str(root), img_size=SIZE, augment=aug, seed=3, file_list=["00001.png"])[0]
    ys, ye, xs, xe = cropped["crop_box"].tolist()
    h, w = cropped["resized_hw"].tolist()
    resized = np.asarray(Image.fromarray(ids).resize((w, h), Image.NEAREST))  # the original's label resize
    np.testing.assert_array_equal(cropped["label"].numpy(), np.vectorize(table.get)(resized[ys:ye, xs:xe]))

    for bad in (35, 99, 249, 251, 255):
        broken = ids.copy()
        broken[5, 7] = bad  # one pixel
        Image.fromarray(broken).save(label_file)
        with pytest.raises(DatasetError, match=rf"^{label_file}: label ids {bad} are not GTA5 label ids"):
            GTA5Dataset(str(root), img_size=SIZE, augment=None, file_list=["00001.png"])[0]


def test_cityscapes_train_and_val(synth: dict[str, str]) -> None:
    aug = JointAugment(resize=100, crop_wh=(48, 32))
    tr = CityscapesDataset(synth["cityscapes"], "train", img_size=SIZE, augment=aug)
    assert len(tr) == 4
    assert tr.files == sorted(tr.files)
    s = tr[(1, 2)]
    assert "label" not in s
    assert s["img"].shape == (3, 32, 48) and s["img"].dtype == torch.uint8
    assert s["img_full"].shape == (3, SIZE[1], SIZE[0]) and s["img_full"].dtype == torch.uint8
    _equal_samples(s, tr[(1, 2)])
    val = CityscapesDataset(synth["cityscapes"], "val", img_size=(64, 32))
    v = val[0]
    assert v["img"].shape == (3, 32, 64)
    assert v["label"].shape == (SIZE[1], SIZE[0]) and v["label"].dtype == torch.uint8
    assert v["path"].endswith("_leftImg8bit.png") and v["index"] == 0


def test_cityscapes_parity_tree() -> None:
    val = CityscapesDataset(PARITY / "cityscapes_tiny", "val", img_size=(192, 96))
    assert len(val) == 2
    s = val[1]
    assert s["img"].shape == (3, 96, 192) and s["label"].shape == (96, 192)
    assert "bochum" in s["path"]


def test_soft_labels(synth: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "soft"
    folder.mkdir()
    tr = CityscapesDataset(synth["cityscapes"], "train", img_size=SIZE)
    for i, f in enumerate(tr.files):
        dtype = np.float16 if i % 2 else np.float32
        np.save(folder / (os.path.basename(f)[:-4] + ".npy"),
                np.full((19, 8, 16), i, dtype=dtype))
    ds = CityscapesDataset(synth["cityscapes"], "train", img_size=SIZE,
                           soft_labels_folder=folder)
    ds.check_soft_labels(19, (8, 16))
    s0, s1 = ds[0], ds[1]
    assert s0["soft_label"].dtype == torch.float32 and s0["soft_label"].shape == (19, 8, 16)
    assert s1["soft_label"].dtype == torch.float16 and float(s1["soft_label"][0, 0, 0]) == 1
    with pytest.raises(DatasetError, match="expected 4x4"):
        ds.check_soft_labels(19, (4, 4))
    bad = folder / (os.path.basename(tr.files[2])[:-4] + ".npy")
    np.save(bad, np.zeros((18, 8, 16), np.float32))
    with pytest.raises(DatasetError, match=bad.name):
        ds.check_soft_labels(19, (8, 16))
    with pytest.raises(DatasetError, match="18 classes"):
        ds[2]
    np.save(bad, np.zeros((8, 16), np.float32))
    with pytest.raises(DatasetError, match="shape"):
        ds[2]
    os.remove(bad)
    with pytest.raises(DatasetError, match=bad.name):
        ds.check_soft_labels(19, (8, 16))
    with pytest.raises(DatasetError, match=bad.name):
        ds[2]


def test_cityscapes_errors(synth: dict[str, str], tmp_path: Path) -> None:
    root = Path(_copy_tree(synth["cityscapes"], tmp_path / "cs"))
    with pytest.raises(DatasetError, match="leftImg8bit"):
        CityscapesDataset(root, "test")
    val = CityscapesDataset(root, "val", img_size=SIZE)
    lbl = Path(val.label_path(val.files[0]))
    img = cv2.imread(str(lbl), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(lbl), img[:, : SIZE[0] // 2])
    with pytest.raises(DatasetError, match=lbl.name):
        val[0]
    os.remove(lbl)
    with pytest.raises(DatasetError, match=lbl.name):
        CityscapesDataset(root, "val")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no .png"):
        CityscapesDataset(empty, "train")
    with pytest.raises(DatasetError, match="soft"):
        CityscapesDataset(root, "train", soft_labels_folder=tmp_path / "nosoft")


# ---- SYNTHIA -----------------------------------------------------------------------


def test_synthia(synth: dict[str, str]) -> None:
    aug = JointAugment(resize=100, crop_wh=(48, 32))
    ds = SynthiaDataset(synth["synthia"], img_size=SIZE, augment=aug)
    assert len(ds) == 6
    s = ds[(0, 1)]
    assert s["img"].shape == (3, 32, 48) and s["label"].shape == (32, 48)
    assert set(torch.unique(s["label"]).tolist()) <= set(range(16)) | {250}
    whole = SynthiaDataset(synth["synthia"], img_size=SIZE)[0]
    vals = set(torch.unique(whole["label"]).tolist())
    assert {0, 2, 9} <= vals  # road, building, sky
    with pytest.raises(ValueError):
        SynthiaDataset(synth["synthia"], num_classes=19)
