"""Inference precision: validation, soft labels and evaluate.py run in float32, as the original.

``--amp`` is the training steps' precision only; ``--inference_amp`` is the one way to get
half-precision inference. Compared with the logits the original computes (float32, no autocast)
for tests/data/parity/cityscapes_tiny with the filled layer-1 weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stages.evaluation
import stages.soft_labels
from model import DecoupleNet
from stages.options import parse_args
from tests.helpers import PARITY, filled_phase1_checkpoint
from utils.distributed import DistEnv

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

TINY = Path(PARITY) / "cityscapes_tiny"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    data = np.load(Path(PARITY) / "interop_expected_logits.npz")
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("precision") / "phase1_filled.pth"
    torch.save(filled_phase1_checkpoint(DecoupleNet(layer=1)), path)
    return path


def _args(stage: str, ckpt: Path, snapshot: Path, *extra: str):
    """The scripts' own argument handling (``--amp bf16`` is accepted on the CPU)."""
    snapshot.mkdir(parents=True, exist_ok=True)
    args = parse_args(stage, "", ["--cpu", "--quiet", "--tgt_rootpath", str(TINY), "--tgt_img_size", "192,96",
                                  "--resume", str(ckpt), "--num-workers", "0", "--batch_size_val", "1",
                                  "--snapshot-dir", str(snapshot), *extra])
    return args


def _record_logits(monkeypatch: pytest.MonkeyPatch, module) -> list[torch.Tensor]:
    """Logits of every forward pass of the network ``module`` builds, as the classifier returns them."""
    seen: list[torch.Tensor] = []
    real = module.build_network

    def build(*a, **kw):
        net = real(*a, **kw)
        net.classifier.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
        return net

    monkeypatch.setattr(module, "build_network", build)
    return seen


def _max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def test_soft_labels_float32_whatever_the_training_amp(ckpt, expected, tmp_path, monkeypatch) -> None:
    outs = {}
    for name, extra in (("off", ["--amp", "off"]), ("amp_bf16", ["--amp", "bf16"]),
                        ("inference_bf16", ["--amp", "off", "--inference_amp", "bf16"])):
        seen = _record_logits(monkeypatch, stages.soft_labels)
        args = _args("soft_label", ckpt, tmp_path / f"snap_{name}", "--output_folder", str(tmp_path / name), *extra)
        assert stages.soft_labels.generate_soft_labels(args, DistEnv()) == 3
        assert seen and {t.dtype for t in seen} == ({torch.bfloat16} if name == "inference_bf16" else {torch.float32})
        outs[name] = {p.stem: np.load(p) for p in sorted((tmp_path / name).glob("*.npy"))}
    train = {k[len("train/"):]: v for k, v in expected.items() if k.startswith("train/")}
    assert sorted(outs["off"]) == sorted(train)
    for stem, want in train.items():
        # --amp bf16 (training) does not reach the soft labels: bit-identical to --amp off ...
        assert outs["amp_bf16"][stem].dtype == np.float32
        np.testing.assert_array_equal(outs["amp_bf16"][stem], outs["off"][stem])
        # ... and both are the original's float32 logits
        assert _max_rel_err(outs["off"][stem], want) <= 1e-4
        # --inference_amp bf16 changes them (bf16 keeps 8 bits of mantissa)
        assert _max_rel_err(outs["inference_bf16"][stem], want) > 1e-3
        assert _max_rel_err(outs["inference_bf16"][stem], want) < 0.2


def test_evaluation_float32_whatever_the_training_amp(ckpt, expected, tmp_path, monkeypatch) -> None:
    """evaluate.py (stages.evaluation.run_evaluation) and the training validation share
    engine.validation.compute_miou; its logits follow --inference_amp only."""
    logits, results = {}, {}
    for name, extra in (("off", ["--amp", "off"]), ("amp_bf16", ["--amp", "bf16"]),
                        ("inference_bf16", ["--inference_amp", "bf16"])):
        seen = _record_logits(monkeypatch, stages.evaluation)
        results[name] = stages.evaluation.run_evaluation(_args("evaluate", ckpt, tmp_path / name, *extra), DistEnv())
        assert {t.dtype for t in seen} == ({torch.bfloat16} if name == "inference_bf16" else {torch.float32})
        logits[name] = [t.float().numpy()[0] for t in seen]
    val = [v for k, v in expected.items() if k.startswith("val/")]
    assert len(logits["off"]) == len(val) == 2
    for i in range(2):
        np.testing.assert_array_equal(logits["amp_bf16"][i], logits["off"][i])
        # the val loader's order is the dataset's; match each output to its expected image
        errs = [_max_rel_err(logits["off"][i], want) for want in val]
        assert min(errs) <= 1e-4
        want = val[int(np.argmin(errs))]
        assert _max_rel_err(logits["inference_bf16"][i], want) > 1e-3
    assert results["amp_bf16"] == results["off"]


def test_inference_amp_fp16_needs_cuda(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args("evaluate", "", ["--cpu", "--inference_amp", "fp16"])
    assert exc.value.code == 2
    assert "--inference_amp fp16" in capsys.readouterr().err
