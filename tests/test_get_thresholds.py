"""Offline class thresholds, datasets/get_thresholds.py (docs/METHOD.md section 5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.reference_rules import original_get_thresholds
from stages.offline_thresholds import (
    ThresholdsError,
    compute_thresholds,
    default_output_name,
)
from tests.helpers import PARITY, REPO

SOFT = Path(PARITY) / "soft_labels"
SOFT16 = Path(PARITY) / "soft_labels_16"  # 16 classes (SYNTHIA-like), every class wins somewhere
SCRIPT = Path(REPO) / "datasets" / "get_thresholds.py"


def _run(args: list[str], cwd: Path | str, module: bool = False, umask: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "datasets.get_thresholds", *args] if module else [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=120,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


@pytest.fixture
def soft_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "gta2city_soft_labels"
    shutil.copytree(SOFT, folder)
    return folder


def test_cli_matches_original_from_datasets_folder(soft_copy: Path, tmp_path: Path) -> None:
    expected = np.load(f"{PARITY}/thresholds_expected.npz")
    out = tmp_path / "out_p0.8.npy"
    # as the README runs it: from inside datasets/, by file name
    proc = _run(["0.8", str(soft_copy), "--output", str(out)], cwd=Path(REPO) / "datasets")
    assert proc.returncode == 0, proc.stderr
    result = np.load(out)
    assert result.dtype == np.float32 and result.shape == (19,)  # the original saves float32
    np.testing.assert_array_equal(result, expected["p0.8"])
    # as a module from the repository root
    out = tmp_path / "out_p0.5.npy"
    proc = _run(["0.5", str(soft_copy), "--output", str(out), "--quiet"], cwd=REPO, module=True)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), expected["p0.5"])
    assert proc.stdout == ""


def test_default_output_name(soft_copy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    rel = os.path.relpath(soft_copy, work) + "/"  # relative, with a trailing slash (dropped)
    proc = _run(["0.80", rel, "--quiet"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(work) == []  # ./../gta2city_soft_labels_thresholds_p0.8.npy: next to the folder
    assert (tmp_path / "gta2city_soft_labels_thresholds_p0.8.npy").is_file()
    assert not list(soft_copy.glob("*thresholds*"))  # never inside the soft-label folder
    # the original's "./{}_thresholds_p{}.npy".format(FOLDER, float(P))
    assert default_output_name("a/b/soft/", 0.5) == os.path.join(".", "a/b/soft_thresholds_p0.5.npy")
    assert default_output_name("soft", float("1e-05")) == os.path.join(".", "soft_thresholds_p1e-05.npy")
    assert default_output_name("/data/soft", 0.8) == "/data/soft_thresholds_p0.8.npy"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_readme_commands_write_next_to_the_folder(tmp_path: Path, umask: int, mode: int) -> None:
    """Both README forms write <root>/datasets/gta2city_soft_labels_thresholds_p0.8.npy (where the
    phase-2 command reads it), float32, with the mode of an ordinary new file under the umask, and
    its records ``..._p0.8_args.json`` / ``_env.json`` beside it."""
    root = tmp_path / "repo"
    shutil.copytree(SOFT, root / "datasets" / "gta2city_soft_labels")
    expected = np.load(f"{PARITY}/thresholds_expected.npz")["p0.8"]
    target = root / "datasets" / "gta2city_soft_labels_thresholds_p0.8.npy"
    for cwd, folder in ((root, "datasets/gta2city_soft_labels"), (root / "datasets", "gta2city_soft_labels")):
        before = sorted(os.listdir(cwd))
        proc = _run(["0.8", folder, "--quiet"], cwd=cwd, umask=umask)
        assert proc.returncode == 0, proc.stderr
        result = np.load(target)
        assert result.dtype == np.float32 and result.shape == (19,)
        np.testing.assert_array_equal(result, expected)
        assert oct(target.stat().st_mode & 0o777) == oct(mode)
        records = [target.with_name(target.stem + suffix) for suffix in ("_args.json", "_env.json")]
        assert all(oct(r.stat().st_mode & 0o777) == oct(mode) for r in records)  # beside it (tests/test_provenance.py)
        written = {target.name, *(r.name for r in records)}
        assert not [n for n in os.listdir(cwd) if n not in before and n not in written]  # nothing else
        for path in (target, *records):
            path.unlink()


def test_in_process_matches_original_rule_with_ties(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        logits = np.round(rng.standard_normal((6, 9, 13)) * 3).astype(np.float32)  # many equal probabilities
        np.save(tmp_path / f"f{i}.npy", logits)
    for p in (0.01, 0.3, 0.5, 0.8, 0.999):
        expected = original_get_thresholds(str(tmp_path), p, num_classes=6)
        np.testing.assert_array_equal(compute_thresholds(str(tmp_path), p, num_classes=6, progress=False), expected)


def test_never_winning_class(tmp_path: Path) -> None:
    folder = tmp_path / "soft"
    folder.mkdir()
    kept = []
    for name in sorted(os.listdir(SOFT))[:3]:
        logits = np.load(SOFT / name)
        logits[5] = -100.0  # pole never wins
        np.save(folder / name, logits)
        kept.append(logits)
    out = tmp_path / "thr.npy"
    proc = _run(["0.8", str(folder), "--output", str(out), "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "5 (pole)" in warnings[0] and "0.0" in warnings[0]
    result = np.load(out)
    assert result[5] == 0.0
    with pytest.warns(UserWarning, match="pole"):
        in_process = compute_thresholds(str(folder), 0.8, progress=False)
    np.testing.assert_array_equal(in_process, result)
    # the other classes follow the rule
    probs = [np.exp(x - x.max(0)) / np.exp(x - x.max(0)).sum(0) for x in kept]
    for c in (0, 13):
        pool = sorted(np.concatenate([p.max(0)[p.argmax(0) == c] for p in probs]).tolist(), reverse=True)
        assert result[c] == pool[int(0.8 * len(pool))]


def test_float16_input(tmp_path: Path) -> None:
    folder = tmp_path / "half"
    folder.mkdir()
    for name in os.listdir(SOFT):
        np.save(folder / name, np.load(SOFT / name).astype(np.float16))
    expected = original_get_thresholds(str(folder), 0.8)  # converts to float32 before the softmax
    np.testing.assert_array_equal(compute_thresholds(str(folder), 0.8, progress=False), expected)


def _bad_file(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir()
    shutil.copy(SOFT / min(os.listdir(SOFT)), folder)
    np.save(folder / name, array)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "not found"),
        ("empty", "no .npy files"),
        ("ndim", "bad_ndim.npy"),
        ("classes", "bad_classes.npy"),
        ("nan", "bad_nan.npy"),
        ("inf", "bad_inf.npy"),
        ("truncated", "bad_truncated.npy: file is truncated"),
        ("p_high", "P must be in [0, 1), got 1.5"),
        ("p_one", "P must be in [0, 1), got 1.0"),
        ("p_negative", "P must be in [0, 1), got -0.1"),
        ("num_classes", "--num-classes 19: the soft labels have 16 classes"),
    ],
)
def test_bad_inputs_exit_2(tmp_path: Path, case: str, message: str) -> None:
    folder, p = tmp_path / "soft", "0.8"
    if case == "empty":
        folder.mkdir()
        (folder / "readme.txt").write_text("no soft labels here")
    elif case == "ndim":
        _bad_file(folder, "bad_ndim.npy", np.zeros((19, 4), dtype=np.float32))
    elif case == "classes":
        _bad_file(folder, "bad_classes.npy", np.zeros((18, 4, 4), dtype=np.float32))
    elif case in ("nan", "inf"):
        logits = np.zeros((19, 4, 4), dtype=np.float32)
        logits[3, 1, 2] = np.nan if case == "nan" else np.inf
        _bad_file(folder, f"bad_{case}.npy", logits)
    elif case == "truncated":
        _bad_file(folder, "bad_truncated.npy", np.zeros((19, 4, 4), dtype=np.float32))
        data = (folder / "bad_truncated.npy").read_bytes()
        (folder / "bad_truncated.npy").write_bytes(data[:-10])
    elif case in ("p_high", "p_one", "p_negative"):
        shutil.copytree(SOFT, folder)
        p = {"p_high": "1.5", "p_one": "1", "p_negative": "-0.1"}[case]
    elif case == "num_classes":
        shutil.copytree(SOFT16, folder)
    extra = ["--num-classes", "19"] if case == "num_classes" else []
    before = sorted(os.listdir(tmp_path))
    proc = _run([p, str(folder), "--quiet", *extra], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_errors_in_process(tmp_path: Path) -> None:
    with pytest.raises(ThresholdsError, match="not found"):
        compute_thresholds(str(tmp_path / "nope"), 0.8, progress=False)
    with pytest.raises(ThresholdsError, match=r"P must be in \[0, 1\)"):
        compute_thresholds(str(SOFT), 1.0, progress=False)
    with pytest.raises(ThresholdsError, match="--num-classes 16: the soft labels have 19 classes"):
        compute_thresholds(str(SOFT), 0.8, num_classes=16, progress=False)


def test_near_ties_follow_the_original_argmax(tmp_path: Path) -> None:
    """Logits a few ulps apart: the fast argmax must fall back to the full rule where the
    winning probability is shared by an earlier class whose exp value is just below 1."""
    rng = np.random.default_rng(1)
    for i in range(4):
        logits = rng.standard_normal((5, 16, 16)).astype(np.float32)
        top = logits.max(axis=0)
        for k, c in enumerate((0, 1, 2)):  # earlier classes 1..3 ulps below the maximum, on some pixels
            near = np.nextafter(top, np.float32(-np.inf))
            for _ in range(k):
                near = np.nextafter(near, np.float32(-np.inf))
            mask = rng.random(top.shape) < 0.3
            logits[c][mask] = near[mask]
        np.save(tmp_path / f"f{i}.npy", logits)
    from stages.offline_thresholds import _softmax_max

    ambiguous = 0
    for name in sorted(os.listdir(tmp_path)):
        x = np.load(tmp_path / name)
        exp_x = np.exp(x - x.max(0, keepdims=True))
        probs = exp_x / exp_x.sum(0, keepdims=True)
        cls, best = _softmax_max(x)
        np.testing.assert_array_equal(best, probs.max(0))
        np.testing.assert_array_equal(cls, probs.argmax(0))
        ambiguous += int(((exp_x >= np.float32(1 - 2**-18)) & (exp_x < 1)).any(axis=0).sum())
    assert ambiguous > 0  # the fallback path really ran
    for p in (0.2, 0.8):
        np.testing.assert_array_equal(compute_thresholds(str(tmp_path), p, num_classes=5, progress=False),
                                      original_get_thresholds(str(tmp_path), p, num_classes=5))


def test_second_pass_without_cache(soft_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache that cannot be written (full disk) costs a second softmax pass, not the result."""
    import stages.offline_thresholds as gt

    def failing_append(self, cls, key):
        self.close()

    monkeypatch.setattr(gt._KeyCache, "append", failing_append)
    expected = np.load(f"{PARITY}/thresholds_expected.npz")
    np.testing.assert_array_equal(compute_thresholds(str(soft_copy), 0.8, progress=False), expected["p0.8"])


@pytest.mark.parametrize("p", ["0.8", "0.5", "0.0"])
def test_16_class_soft_labels_match_original(tmp_path: Path, p: str) -> None:
    """SYNTHIA-like soft labels: the class count comes from the files, as the original's (its
    softmax runs over the files' first axis); --num-classes 16 is accepted as a check. Oracle:
    the original's get_thresholds.py run on these files (thresholds_16_expected.npz); P = 0, which
    it accepts, is each class's highest probability."""
    expected = np.load(f"{PARITY}/thresholds_16_expected.npz")[f"p{p}"]
    assert expected.shape == (16,) and expected.dtype == np.float32
    for extra in ([], ["--num-classes", "16"]):
        out = tmp_path / f"thr{len(extra)}.npy"
        proc = _run([p, str(SOFT16), "--output", str(out), *extra], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        result = np.load(out)
        assert result.dtype == np.float32 and result.shape == (16,)
        np.testing.assert_array_equal(result, expected)
        assert "16 (" not in proc.stdout and "15 (bicycle)" in proc.stdout  # SYNTHIA's class names
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == (1 if p == "0.0" else 0) and (p != "0.0" or "P = 0" in warnings[0]), proc.stderr
    np.testing.assert_array_equal(compute_thresholds(str(SOFT16), float(p), progress=False), expected)
