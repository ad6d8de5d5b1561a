"""``--compile``: the network's parts are compiled in place, so checkpoints keep their keys."""

from __future__ import annotations

import pytest
import torch

from engine.network import compile_network
from model import DecoupleNet
from tests.helpers import filled_phase1_checkpoint

pytestmark = pytest.mark.slow  # runs the scripts end to end or a training loop (tests/README.md)


def test_compile_in_place_keeps_keys_and_outputs() -> None:
    torch.manual_seed(0)
    net = DecoupleNet(layer=1)
    net.load_official(filled_phase1_checkpoint(net))
    net.eval()
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        eager = net(x)
    keys = list(net.state_dict())
    # "eager" runs dynamo's capture without code generation: fast on the CPU; training uses inductor
    assert compile_network(net, backend="eager") == ["source_stem", "target_stem", "body", "head"]
    assert list(net.state_dict()) == keys
    assert net.body._compiled_call_impl is not None
    with torch.no_grad():
        compiled = net(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert DecoupleNet(layer=1).load_official(net.official_state(phase=1)) == "phase1"
