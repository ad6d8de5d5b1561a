"""CUDA switches: cuDNN autotuning (off by default, as the original), ``--tf32``, and the
``--channels_last`` / ``--compile`` flags of ``evaluate.py`` and ``generate_soft_label.py``.

No GPU is needed: ``torch.backends`` flags can be set and read without one, and a module without
tensors moves to a ``cuda`` device without touching CUDA. The inference tests run the stages on
the CPU with the layout decision (:func:`engine.network.use_channels_last`, CUDA only) forced on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine.network
import engine.validation
import stages.evaluation
import stages.soft_labels
from engine.backends import backend_settings
from engine.network import prepare_for_inference, prepare_for_training
from model import DecoupleNet
from stages.options import build_parser, parse_args
from tests.helpers import PARITY, filled_phase1_checkpoint
from tests.test_inference_precision import _args as inference_args
from utils.distributed import DistEnv

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)

CUDA = DistEnv(device=torch.device("cuda", 0))


@pytest.fixture
def backends() -> Iterator[None]:
    """Restore the process-wide flags the tests change."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _args(stage: str, *extra: str):
    return parse_args(stage, "", ["--resume", "", *extra])


@pytest.mark.parametrize("stage", ["phase1", "phase2", "source_only"])
def test_cudnn_benchmark_stays_off_for_training_on_cuda_unless_asked(stage, backends) -> None:
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the original keeps
    prepare_for_training(nn.Module(), CUDA, _args(stage))
    assert torch.backends.cudnn.benchmark is False
    prepare_for_training(nn.Module(), CUDA, _args(stage, "--cudnn_benchmark"))
    assert torch.backends.cudnn.benchmark is True


def test_cudnn_benchmark_for_inference_and_never_on_the_cpu(backends) -> None:
    torch.backends.cudnn.benchmark = False
    prepare_for_inference(nn.Module(), CUDA, _args("evaluate"))
    assert torch.backends.cudnn.benchmark is False
    prepare_for_training(nn.Module(), DistEnv(), _args("phase1", "--cudnn_benchmark"))
    assert torch.backends.cudnn.benchmark is False  # a CPU run leaves the CUDA flags alone
    prepare_for_inference(nn.Module(), CUDA, _args("soft_label", "--cudnn_benchmark"))
    assert torch.backends.cudnn.benchmark is True


def test_tf32_default_leaves_pytorch_settings_on_off_set_both(backends) -> None:
    args = _args("phase1")
    assert backend_settings(args.tf32, args.cudnn_benchmark) == {"cudnn_benchmark": None, "cudnn_tf32": None, "matmul_tf32": None}
    # unusual values first, so that "default" visibly leaves whatever is set
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
    prepare_for_training(nn.Module(), CUDA, _args("phase1"))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, True)
    prepare_for_training(nn.Module(), CUDA, _args("phase2", "--tf32", "on"))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    prepare_for_inference(nn.Module(), CUDA, _args("evaluate", "--tf32", "off"))
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    # Both APIs stay readable (inductor reads the legacy cuDNN flag and the newer matmul one);
    # setting through the newer API instead would make the legacy reads raise on torch 2.14.
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        prepare_for_training(nn.Module(), CUDA, _args("phase1", "--tf32", "on"))
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.allow_tf32 is True


def test_new_flags_in_every_script_with_the_originals_behaviour_as_default() -> None:
    for stage in ("phase1", "phase2", "soft_label", "source_only", "evaluate"):
        parser = build_parser(stage, "test")
        args = parser.parse_args([])
        assert (args.cudnn_benchmark, args.tf32) == (False, "default")
        text = parser.format_help()
        assert "--cudnn_benchmark" in text and "as the original" in text
    with pytest.raises(SystemExit):
        build_parser("phase1", "test").parse_args(["--tf32", "maybe"])


# ---------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cl") / "phase1_filled.pth"
    torch.save(filled_phase1_checkpoint(DecoupleNet(layer=1)), path)
    return path


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    data = np.load(Path(PARITY) / "interop_expected_logits.npz")
    return {k: data[k] for k in data.files}


def _force_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--channels_last`` decides as on CUDA (the CPU ignores the flag otherwise)."""
    for module in (engine.network, engine.validation, stages.soft_labels):
        monkeypatch.setattr(module, "use_channels_last", lambda requested, device: bool(requested))


def _spy_forward(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """For every forward of a DecoupleNet: the input's and the weights' layout, whether compiled."""
    seen: list[dict] = []
    real = DecoupleNet.forward

    def forward(self, x, *a, **kw):
        cl = torch.channels_last
        seen.append({"input": x.is_contiguous(memory_format=cl) and not x.is_contiguous(),
                     "weights": all(m.weight.is_contiguous(memory_format=cl) for m in self.modules()
                                    if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)),
                     "compiled": self.body._compiled_call_impl is not None})
        return real(self, x, *a, **kw)

    monkeypatch.setattr(DecoupleNet, "forward", forward)
    return seen


def test_soft_labels_convert_network_and_input_and_compile(ckpt, expected, tmp_path, monkeypatch) -> None:
    _force_channels_last(monkeypatch)
    monkeypatch.setattr(engine.network, "COMPILE_BACKEND", "eager")  # dynamo's capture, no code generation: quick
    seen = _spy_forward(monkeypatch)
    out = tmp_path / "soft"
    args = inference_args("soft_label", ckpt, tmp_path / "snap", "--output_folder", str(out), "--channels_last",
                           "--compile")
    assert stages.soft_labels.generate_soft_labels(args, DistEnv()) == 3
    assert seen and all(s == {"input": True, "weights": True, "compiled": True} for s in seen), seen
    # and the logits are still the original's float32 ones
    for key, want in expected.items():
        if key.startswith("train/"):
            got = np.load(out / f"{key[len('train/'):]}.npy")
            assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4


def test_evaluation_converts_network_and_input_and_compiles(ckpt, tmp_path, monkeypatch) -> None:
    _force_channels_last(monkeypatch)
    monkeypatch.setattr(engine.network, "COMPILE_BACKEND", "eager")  # dynamo's capture, no code generation: quick
    seen = _spy_forward(monkeypatch)
    args = inference_args("evaluate", ckpt, tmp_path / "snap", "--channels_last", "--compile")
    result = stages.evaluation.run_evaluation(args, DistEnv())
    assert len(seen) == 2 and all(s == {"input": True, "weights": True, "compiled": True} for s in seen), seen
    plain = stages.evaluation.run_evaluation(inference_args("evaluate", ckpt, tmp_path / "plain"), DistEnv())
    assert not any(s["input"] or s["weights"] or s["compiled"] for s in seen[2:])
    assert result["miou"] == pytest.approx(plain["miou"], abs=1e-6)
