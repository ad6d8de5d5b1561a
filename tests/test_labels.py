"""Labels, palette and the safe label-info pickle (docs/METHOD.md section 1)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.errors import DatasetError
from datasets.label_info import load_label_info, save_label_info
from datasets.labels import (
    CLASS_NAMES_13,
    CLASS_NAMES_16,
    CLASS_NAMES_19,
    IGNORE_LABEL,
    PALETTE,
    class_names,
    colorize,
    encode_labels,
    synthia_encode_labels,
)

PARITY = Path(__file__).parent / "data" / "parity"

CS_19 = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


def test_encode_labels_matches_original() -> None:
    ids = np.array(Image.open(PARITY / "labels_raw.png"))
    expected = np.load(PARITY / "labels_cityscapes_trainid.npy")
    out = encode_labels(ids)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_encode_labels_every_id() -> None:
    ids = np.arange(256, dtype=np.uint8)
    out = encode_labels(ids)
    for i in range(256):
        want = CS_19.index(i) if i in CS_19 else IGNORE_LABEL
        assert out[i] == want, i
    # Other integer dtypes, out-of-range values.
    wide = np.array([7, 33, -1, 300, 65535], dtype=np.int64)
    np.testing.assert_array_equal(encode_labels(wide), [0, 18, 250, 250, 250])
    np.testing.assert_array_equal(encode_labels(np.array([26], dtype=np.uint16)), [13])


def test_encode_16_and_13() -> None:
    ids16 = [7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33]
    np.testing.assert_array_equal(encode_labels(np.array(ids16, np.uint8), 16), np.arange(16))
    assert encode_labels(np.array([22, 27, 31], np.uint8), 16).tolist() == [250] * 3
    ids13 = [7, 8, 11, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33]
    np.testing.assert_array_equal(encode_labels(np.array(ids13, np.uint8), 13), np.arange(13))
    assert encode_labels(np.array([12, 13, 17], np.uint8), 13).tolist() == [250] * 3
    with pytest.raises(ValueError):
        encode_labels(np.zeros(3, np.uint8), 18)


def test_synthia_encode() -> None:
    syn16 = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
    out = synthia_encode_labels(np.array(syn16, dtype=np.uint16), 16)
    np.testing.assert_array_equal(out, np.arange(16))
    syn13 = [3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
    np.testing.assert_array_equal(synthia_encode_labels(np.array(syn13), 13), np.arange(13))
    assert synthia_encode_labels(np.array([0, 13, 14, 16, 18, 20, 22, 1000]), 16).tolist() == [
        250
    ] * 8


def test_class_names_and_palette() -> None:
    assert len(CLASS_NAMES_19) == 19 and CLASS_NAMES_19[0] == "road"
    assert CLASS_NAMES_19[-1] == "bicycle"
    assert class_names(16) == CLASS_NAMES_16 and len(CLASS_NAMES_16) == 16
    assert class_names(13) == CLASS_NAMES_13 and len(CLASS_NAMES_13) == 13
    assert set(CLASS_NAMES_13) <= set(CLASS_NAMES_16) <= set(CLASS_NAMES_19)
    assert not {"wall", "fence", "pole"} & set(CLASS_NAMES_13)
    assert len(PALETTE) == 19 and PALETTE[0] == (128, 64, 128) and PALETTE[18] == (119, 11, 32)


def test_colorize() -> None:
    t = np.array([[0, 13], [250, 18]], dtype=np.uint8)
    rgb = colorize(t)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[0, 1]) == PALETTE[13]
    assert tuple(rgb[1, 0]) == (0, 0, 0) and tuple(rgb[1, 1]) == PALETTE[18]


# ---- label info -------------------------------------------------------------------


def test_load_parity_label_info() -> None:
    l2f, f2l = load_label_info(PARITY / "gtav_label_info.p")
    assert len(l2f) == 19 and all(isinstance(n, str) for names in l2f for n in names)
    for c, names in enumerate(l2f):
        for n in names:
            assert c in f2l[n]


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "gtav_label_info.p"
    with open(bad, "wb") as f:
        pickle.dump(([["a.png"]], {"a.png": [0], "x": _Evil(str(marker))}), f)
    with pytest.raises(DatasetError, match="gtav_label_info.p") as exc:
        load_label_info(bad)
    assert "system" in str(exc.value)
    assert not marker.exists()


def test_label_info_with_numpy_values(tmp_path: Path) -> None:
    l2f = [np.array(["a.png", "b.png"]), ["b.png"]]
    f2l = {"a.png": np.array([0], dtype=np.int64), "b.png": [np.int64(0), np.int32(1)]}
    for proto in (2, 3, 4, 5):
        p = tmp_path / f"info{proto}.p"
        with open(p, "wb") as f:
            pickle.dump((l2f, f2l), f, protocol=proto)
        a, b = load_label_info(p)
        assert a == [["a.png", "b.png"], ["b.png"]]
        assert b == {"a.png": [0], "b.png": [0, 1]}
        assert all(type(v) is int for v in b["b.png"])


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "garbled"),
        (b"\x80\x04not a pickle at all", "gtav"),
        (pickle.dumps([1, 2, 3]), "tuple"),
        (pickle.dumps(([["a.png"]], ["a.png"])), "file_to_label"),
        (pickle.dumps(([["a.png"]], {})), "missing from file_to_label"),
        (pickle.dumps(([["a.png"]], {"a.png": [5]})), "outside"),
        (pickle.dumps(("abc", {})), "label_to_file"),
    ],
)
def test_label_info_bad_files(tmp_path: Path, payload: bytes, match: str) -> None:
    p = tmp_path / "gtav_label_info.p"
    p.write_bytes(payload)
    with pytest.raises(DatasetError, match=match) as exc:
        load_label_info(p)
    assert str(p) in str(exc.value)


def test_label_info_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_label_info(tmp_path / "nope.p")


def test_label_info_dict_per_class(tmp_path: Path) -> None:
    p = tmp_path / "i.p"
    p.write_bytes(pickle.dumps(({1: ["b.png"], 0: ["a.png"]}, {"a.png": [0], "b.png": [1]})))
    l2f, _ = load_label_info(p)
    assert l2f == [["a.png"], ["b.png"]]


def test_save_label_info_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "gtav_label_info.p"
    l2f = [["a.png", "b.png"], [], ["b.png"]]
    f2l = {"a.png": [0], "b.png": [0, 2]}
    save_label_info(p, l2f, f2l)
    with open(p, "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw, tuple) and raw == (l2f, f2l)
    assert load_label_info(p) == (l2f, f2l)
    assert os.listdir(p.parent) == ["gtav_label_info.p"]  # no temporary left behind
