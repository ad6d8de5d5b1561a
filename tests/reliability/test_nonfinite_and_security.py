"""A NaN loss stops the run cleanly; crafted pickles are refused without running their code; every
``torch.load`` of the project is ``weights_only=True``."""

from __future__ import annotations

import ast
import os
import pickle
import re
import shutil
import tokenize
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.reliability.conftest import copy_data, phase1_argv
from tests.reliability.runner import one_error_line, temp_files

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

STEPS = ["--batch-size", "1", "--num-steps", "4", "--num-steps-stop", "4", "--save_latest_every", "1"]
PICKLE_CASES = [("--resume", "torch"), ("--resume", "pickle"), ("--resume_from", "torch"), ("gtav_label_info.p", "pickle")]


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _write_evil(path: Path, marker: Path, fmt: str) -> None:
    if fmt == "torch":  # torch.save's zip format
        torch.save({"model_state_dict": Payload(marker)}, path)
    else:  # a bare pickle, as old torch files and gtav_label_info.p are
        with open(path, "wb") as f:
            pickle.dump(Payload(marker), f)


@pytest.fixture(scope="module")
def outcomes(scripts, synthetic_data, sourceonly_ckpt, tmp_path_factory):
    """The NaN run and the four crafted-pickle runs, a few at a time."""
    root = tmp_path_factory.mktemp("nonfinite_security")
    runs, info = [], []
    snap = root / "nan" / "snap"
    runs.append((phase1_argv(synthetic_data, sourceonly_ckpt, snap, *STEPS), {"DECOUPLENET_FAULT": "nan_at_iter:1"}))
    info.append({"snap": snap})
    for i, (where, fmt) in enumerate(PICKLE_CASES):
        folder = root / f"pickle{i}"
        folder.mkdir()
        marker, data, ckpt, extra = folder / "pwned", synthetic_data, Path(sourceonly_ckpt), []
        if where == "gtav_label_info.p":
            data = copy_data(synthetic_data, folder / "data")
            evil = data["gta5"] / "gtav_label_info.p"
        else:
            evil = folder / "evil.pth"
            if where == "--resume":
                ckpt = evil
            else:
                extra = ["--resume_from", evil]
        _write_evil(evil, marker, fmt)
        runs.append((phase1_argv(data, ckpt, folder / "snap", *STEPS, *extra), None))
        info.append({"marker": marker, "evil": evil})
    results = scripts.run_many(runs, parallel=3)
    yield {"nan": (results[0], info[0]), **{case: (r, i) for case, r, i in zip(PICKLE_CASES, results[1:], info[1:])}}
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- non-finite loss
def test_nan_loss_stops_with_one_line_and_keeps_latest(outcomes) -> None:
    result, info = outcomes["nan"]
    snap = info["snap"]
    one_error_line(result, "non-finite loss at iteration 1", "total", str(snap / "latest.pth"))
    state = torch.load(snap / "latest.pth", map_location="cpu", weights_only=True, mmap=True)
    assert state["iteration"] == 1  # written after iteration 0; the NaN step updated nothing
    for group in ("model", "extra_modules"):
        tensors = [v for v in _tensors(state[group]) if v.is_floating_point()]
        assert tensors and all(torch.isfinite(v).all() for v in tensors), group
    assert not (snap / "GTA5_4.pth").exists() and temp_files(snap) == []


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


# ---------------------------------------------------------------------------- crafted pickles
def test_the_payload_would_run_under_plain_pickle(tmp_path) -> None:
    """Control: the crafted pickle does execute code when loaded without restrictions."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))  # the point of the test
    assert marker.exists()


@pytest.mark.parametrize("where,fmt", PICKLE_CASES)
def test_crafted_pickle_is_refused(where, fmt, outcomes) -> None:
    result, info = outcomes[where, fmt]
    needles = ["refus"] if where == "gtav_label_info.p" else ["not a loadable checkpoint", "refus"]
    if fmt == "torch" or where == "gtav_label_info.p":
        needles.append("posix.system")  # the line names what was refused
    one_error_line(result, str(info["evil"]), *needles)
    assert not info["marker"].exists(), f"the crafted {where} ran its code"


# ---------------------------------------------------------------------------- static checks
def _project_sources() -> list[Path]:
    skip = {".venv", ".git", "__pycache__", "node_modules"}
    out = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        out.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(out)


def _calls(path: Path, module: str, name: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def _torch_load_references(path: Path) -> list[tuple[int, bool]]:
    """``(line, is_called)`` of every ``torch.load`` in the code (strings and comments excluded)."""
    with open(path, "rb") as f:
        toks = [t for t in tokenize.tokenize(f.readline)
                if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
    out = []
    for i in range(len(toks) - 2):
        if [t.string for t in toks[i:i + 3]] == ["torch", ".", "load"] and toks[i].type == tokenize.NAME:
            out.append((toks[i].start[0], i + 3 < len(toks) and toks[i + 3].string == "("))
    return out


def test_every_torch_load_is_weights_only() -> None:
    bad, found = [], 0
    for path in _project_sources():
        text = path.read_text(encoding="utf-8")
        if "load" not in text:
            continue
        rel = path.relative_to(REPO)
        calls = _calls(path, "torch", "load")
        found += len(calls)
        bad += [f"{rel}:{c.lineno}" for c in calls if _keyword(c, "weights_only") is not True]
        # No torch.load used other than as a direct call (an alias would escape the check above).
        call_lines = {c.lineno for c in calls}
        bad += [f"{rel}:{line} (torch.load not called directly)" for line, called in _torch_load_references(path)
                if not called or line not in call_lines]
        if re.search(r"^\s*from\s+torch\s+import\s+.*\bload\b", text, re.MULTILINE):
            bad.append(f"{rel}: `from torch import load`")
    assert found >= 2, "no torch.load found: the scan is broken"
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)


def test_no_unrestricted_unpickling_in_the_project() -> None:
    bad = []
    for path in _project_sources():
        rel = path.relative_to(REPO)
        if rel.parts[0] == "tests":
            continue
        for fn in ("load", "loads"):
            bad += [f"{rel}:{c.lineno} pickle.{fn}" for c in _calls(path, "pickle", fn)]
        bad += [f"{rel}:{c.lineno} np.load allow_pickle=True" for c in _calls(path, "np", "load")
                if _keyword(c, "allow_pickle") is True]
    assert not bad, "\n".join(bad)
