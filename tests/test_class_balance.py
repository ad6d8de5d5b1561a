"""Class-balanced GTA5 list (docs/METHOD.md section 1)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from datasets.class_balance import class_balanced_list
from datasets.label_info import load_label_info

PARITY = Path(__file__).parent / "data" / "parity"


def _reference(label_to_file, file_to_label, max_iters, seed=1234, sub_epoch=3000, nc=19):
    """The original algorithm, written plainly (np.random.choice), for comparison."""
    label_to_file = copy.deepcopy(label_to_file)
    np.random.seed(seed)
    ind = dict.fromkeys(range(nc), 0)
    out = []
    for _ in range(int(max_iters / sub_epoch) + 1):
        cur = np.zeros(nc)
        for _ in range(sub_epoch):
            dist = cur.copy() if cur.sum() == 0 else cur / cur.sum()
            w = 1 / np.log(1 + 1e-2 + dist)
            w = w / w.sum()
            c = np.random.choice(nc, p=w)
            if ind[c] > len(label_to_file[c]) - 1:
                np.random.shuffle(label_to_file[c])
                ind[c] = ind[c] % (len(label_to_file[c]) - 1)
            name = label_to_file[c][ind[c]]
            out.append(name)
            ind[c] += 1
            cur[file_to_label[name]] += 1
    return out


def test_matches_original_fixture() -> None:
    expected = json.loads((PARITY / "class_balance_expected.json").read_text())
    l2f, f2l = load_label_info(PARITY / "gtav_label_info.p")
    out = class_balanced_list(
        l2f, f2l, expected["max_iters"], seed=expected["seed"], sub_epoch=expected["sub_epoch"]
    )
    assert out == expected["ids"]


@pytest.mark.parametrize("seed", [0, 7])
def test_matches_reference_random_info(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [f"{i:05d}.png" for i in range(30)]
    f2l = {n: sorted(rng.choice(19, size=int(rng.integers(1, 8)), replace=False).tolist())
           for n in names}
    l2f = [[n for n in names if c in f2l[n]] for c in range(19)]
    for c in range(19):  # every class needs >= 2 files for the original not to crash
        for n in names[2 * c: 2 * c + 2]:
            if n not in l2f[c]:
                l2f[c].append(n)
                f2l[n] = sorted(f2l[n] + [c])
    out = class_balanced_list(l2f, f2l, 2500, seed=seed, sub_epoch=500)
    assert out == _reference(l2f, f2l, 2500, seed=seed, sub_epoch=500)
    assert len(out) == (int(2500 / 500) + 1) * 500


def test_restores_rng_and_does_not_mutate() -> None:
    l2f, f2l = load_label_info(PARITY / "gtav_label_info.p")
    before = copy.deepcopy(l2f)
    np.random.seed(99)
    expect_next = np.random.random_sample(3)
    np.random.seed(99)
    class_balanced_list(l2f, f2l, 100)
    np.testing.assert_array_equal(np.random.random_sample(3), expect_next)
    assert l2f == before


def test_classes_with_fewer_than_two_files() -> None:
    # class 0: one file, class 1: no file, the rest two files each.
    names = [f"f{i}.png" for i in range(40)]
    l2f = [["only.png"], []] + [[names[2 * c], names[2 * c + 1]] for c in range(2, 19)]
    f2l = {"only.png": [0]}
    for c in range(2, 19):
        f2l[names[2 * c]] = [c]
        f2l[names[2 * c + 1]] = [c]
    out = class_balanced_list(l2f, f2l, 100, sub_epoch=400)
    assert len(out) == 400
    assert out.count("only.png") > 2  # reused, no crash
    assert set(out) <= set(f2l)


def test_one_file_for_everything() -> None:
    l2f, f2l = load_label_info(PARITY / "phase1_step" / "gta5_one" / "gtav_label_info.p")
    out = class_balanced_list(l2f, f2l, 10)
    assert out == ["00001.png"] * 3000


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        class_balanced_list([[] for _ in range(19)], {}, 10)
    with pytest.raises(ValueError, match="file_to_label"):
        class_balanced_list([["a.png"]] * 19, {}, 10)


# ---------------------------------------------------------------------------- the list the scripts build
def _parsed(stage: str, *argv: str):
    """Options through the scripts' own parser (the list does not depend on the world size:
    tests/test_phase1_train.py checks it through a real two-process run)."""
    from stages.options import parse_args

    return parse_args(stage, "", list(argv))


@pytest.fixture
def gta5_root(tmp_path: Path) -> Path:
    root = tmp_path / "gta5"
    root.mkdir()
    (root / "gtav_label_info.p").write_bytes((PARITY / "gtav_label_info.p").read_bytes())
    return root


def test_length_is_num_steps_times_total_batch_under_four_gpus(gta5_root: Path, tmp_path: Path) -> None:
    from datasets.build import balanced_file_list, class_balance_draws

    four = ("--batch-size", "8", "--dist", "--gpus", "0,1,2,3")
    # the original: --batch-size 8 over 4 ranks is 2 a rank; max_iters = num_steps * 2 * 4
    def draws(args) -> int:
        return class_balance_draws(args.num_steps, args.batch_size)

    assert draws(_parsed("phase1", *four)) == 750_000  # 93,750 x 8
    assert draws(_parsed("phase2", *four)) == 500_000  # 62,500 x 8
    assert draws(_parsed("phase1", "--batch-size", "8")) == 750_000  # one process, same list
    # drawn: int(8000 / 3000) + 1 = 3 rounds of 3000 (4x too many draws would give 11 rounds)
    args = _parsed("phase1", *four, "--num-steps", "1000", "--num-steps-stop", "10")
    names = balanced_file_list(args, str(gta5_root), cache_dir=str(tmp_path))
    assert len(names) == 9000
    l2f, f2l = load_label_info(PARITY / "gtav_label_info.p")
    assert names == _reference(l2f, f2l, 8000, seed=1234)
    assert [p.name for p in tmp_path.glob("class_balance_*.json")] == [
        next(p.name for p in tmp_path.glob("class_balance_*_8000_1234_19.json"))]


def test_seed_is_random_seed(gta5_root: Path, tmp_path: Path) -> None:
    from datasets.build import balanced_file_list

    l2f, f2l = load_label_info(PARITY / "gtav_label_info.p")
    common = ("--batch-size", "2", "--num-steps", "4", "--num-steps-stop", "4")
    five = balanced_file_list(_parsed("phase1", *common, "--random-seed", "5"), str(gta5_root), str(tmp_path))
    assert five == _reference(l2f, f2l, 8, seed=5)  # np.random.seed(--random-seed), as the original
    default = balanced_file_list(_parsed("phase1", *common), str(gta5_root), str(tmp_path))
    assert default == _reference(l2f, f2l, 8, seed=1234)
    assert five != default
    # the cache key holds the seed used: one file per seed, and seed 5 reads back its own list
    assert sorted(p.name.split("_")[-2] for p in tmp_path.glob("class_balance_*_8_*_19.json")) == ["1234", "5"]
    assert balanced_file_list(_parsed("phase1", *common, "--random-seed", "5"), str(gta5_root), str(tmp_path)) == five
