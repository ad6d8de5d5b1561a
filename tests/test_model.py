"""Model parity with the original (tests/data/parity/forward_layer1.npz, model_keys.json)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import CheckpointError, DecoupleNet, FCDiscriminator
from tests.helpers import PARITY, filled_phase1_checkpoint, filled_sourceonly_checkpoint, filled_state


@pytest.fixture(scope="module")
def filled_net():
    torch.manual_seed(0)
    net = DecoupleNet(layer=1)
    net.load_official(filled_phase1_checkpoint(net))
    d1 = FCDiscriminator(net.stem_channels, 32)
    d1.load_state_dict(filled_state("D1", d1.state_dict()))
    d2 = FCDiscriminator(19, 64)
    d2.load_state_dict(filled_state("D2", d2.state_dict()))
    return net.eval(), d1.eval(), d2.eval()


def _close(got: torch.Tensor, expected: np.ndarray, rtol: float = 1e-4) -> None:
    got = got.detach().numpy()
    scale = np.abs(expected).max()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.slow
def test_forward_parity_layer1(filled_net):
    net, d1, d2 = filled_net
    ref = np.load(os.path.join(PARITY, "forward_layer1.npz"))
    x = torch.from_numpy(ref["x"])
    size = x.shape[-2:]
    with torch.no_grad():
        stem_src = net.stem(x, "source")
        _close(stem_src, ref["stem_src"])
        _close(net(x, domain="source"), ref["logits_src"])
        logits, aux = net.forward_with_aux(x)
        _close(logits, ref["logits_tgt"])
        _close(net(x), ref["logits_tgt"])
        _close(aux, ref["logits_aux_tgt"])
        up = F.interpolate(stem_src, size=size, mode="bilinear", align_corners=True)
        _close(d1(up), ref["d1_src"])
        prob = F.softmax(F.interpolate(logits, size=size, mode="bilinear", align_corners=True), 1)
        _close(d2(prob), ref["d2_tgt"])


@pytest.mark.slow
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_official_key_layout(layer):
    with open(os.path.join(PARITY, "model_keys.json")) as f:
        keys = json.load(f)[f"layer{layer}"]
    net = DecoupleNet(layer=layer)
    state = net.official_state(phase=1)
    for group in ("model_B1", "model_B2", "model_B", "head", "classifier", "aux_classifier"):
        got = [[k, list(v.shape)] for k, v in state[f"{group}_state_dict"].items()]
        assert got == keys[group], group
    phase2 = DecoupleNet(layer=layer, decoupled=False, aux=False).official_state(phase=2)
    assert list(phase2) == [
        "model_B2_state_dict", "model_B_state_dict", "head_state_dict", "classifier_state_dict"
    ]
    d1 = FCDiscriminator(net.stem_channels, 32)
    d2 = FCDiscriminator(19, 64)
    assert [[k, list(v.shape)] for k, v in d1.state_dict().items()] == keys["D1"]
    assert [[k, list(v.shape)] for k, v in d2.state_dict().items()] == keys["D2"]


@pytest.mark.slow
def test_load_formats_and_module_prefix(filled_net):
    net, _, _ = filled_net
    ref = net.official_state(phase=1)
    # phase-2 dict with DDP prefixes into a target-only network
    phase2 = {
        g: {f"module.{k}": v for k, v in ref[g].items()}
        for g in ("model_B2_state_dict", "model_B_state_dict", "head_state_dict", "classifier_state_dict")
    }
    target = DecoupleNet(layer=1, decoupled=False, aux=False)
    assert target.load_official(phase2) == "phase2"
    for k, v in target.target_stem.state_dict().items():
        assert torch.equal(v, ref["model_B2_state_dict"][k])
    # phase-1 dict into a target-only network: source stem ignored
    assert target.load_official(ref) == "phase1"
    # source-only dict: backbone into both stems and body, classifier into aux classifier
    so = filled_sourceonly_checkpoint(layer=1)
    full = DecoupleNet(layer=1)
    assert full.load_official(so) == "sourceonly"
    st = full.official_state(phase=1)
    for k, v in st["model_B1_state_dict"].items():
        assert torch.equal(v, st["model_B2_state_dict"][k])
        assert torch.equal(v, ref["model_B2_state_dict"][k])
    for k, v in st["classifier_state_dict"].items():
        assert torch.equal(v, st["aux_classifier_state_dict"][k])


def test_load_errors_name_the_key(filled_net):
    net, _, _ = filled_net
    ref = net.official_state(phase=1)
    target = DecoupleNet(layer=1, decoupled=False, aux=False)
    bad = {k: dict(v) for k, v in ref.items()}
    del bad["model_B_state_dict"]["0.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing key model_B/0\.0\.conv1\.weight"):
        target.load_official(bad)
    bad = {k: dict(v) for k, v in ref.items()}
    bad["head_state_dict"]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key head/extra.weight"):
        target.load_official(bad)
    bad = {k: dict(v) for k, v in ref.items()}
    bad["classifier_state_dict"]["weight"] = torch.zeros(16, 128, 1, 1)
    with pytest.raises(CheckpointError, match="shape mismatch for classifier/weight"):
        target.load_official(bad)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        target.load_official({"state_dict": {}})
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        target.load_official([1, 2])
    with pytest.raises(CheckpointError, match="missing key model_B2/5"):
        DecoupleNet(layer=2, decoupled=False, aux=False).load_official(ref)


def test_freeze_bn_keeps_statistics():
    net = DecoupleNet(layer=0, freeze_bn=True, decoupled=False, aux=False).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    x = torch.rand(1, 3, 32, 32)
    net(x).sum().backward()
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    bn = net.target_stem[1]
    assert not bn.training and not bn.weight.requires_grad and bn.weight.grad is None
    assert set(net.official_state(2)["model_B2_state_dict"]) >= {"1.num_batches_tracked"}


def test_imagenet_missing_file_message(tmp_path):
    net = DecoupleNet(layer=0, decoupled=False, aux=False)
    with pytest.raises(FileNotFoundError, match="resnet101-5d3b4d8f.pth"):
        net.load_imagenet(str(tmp_path / "resnet101-5d3b4d8f.pth"))


@pytest.mark.slow
def test_imagenet_file_loads_into_stems_and_body(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet101(weights=None)
    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(resnet.state_dict(), path)
    net = DecoupleNet(layer=1)
    net.load_imagenet(str(path))
    assert torch.equal(net.source_stem[0].weight, resnet.conv1.weight)
    assert torch.equal(net.target_stem[4][0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert torch.equal(net.body[2][1].conv2.weight, resnet.layer4[1].conv2.weight)


@pytest.mark.slow
def test_fresh_head_and_classifiers_follow_the_originals_rule():
    """The original's model/classifier.py rule, re-drawn by hand in its train_phase1.py order:
    two ResNet-101s; D1, D2; four ``nn.Conv2d(2048, hidden, 3, padding=d, dilation=d)`` built
    in turn, then ``weight.data.normal_(0, 0.01)`` on each (biases keep the default init); the
    classifier ``nn.Conv2d(hidden, C, 1)``; a second head (dropped) and its classifier, the aux
    classifier (copied from the classifier only when ``--resume`` is given)."""
    import torchvision

    def heads() -> tuple[torch.nn.ModuleList, torch.nn.Conv2d]:
        convs = [torch.nn.Conv2d(2048, 128, 3, padding=d, dilation=d, bias=True) for d in (6, 12, 18, 24)]
        for m in convs:
            m.weight.data.normal_(0, 0.01)
        return torch.nn.ModuleList(convs), torch.nn.Conv2d(128, 19, 1)

    torch.manual_seed(11)
    net = DecoupleNet(layer=1, after_backbone=lambda: (FCDiscriminator(256, 32), FCDiscriminator(19, 64)))
    torch.manual_seed(11)
    for _ in range(2):
        torchvision.models.resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
    FCDiscriminator(256, 32), FCDiscriminator(19, 64)
    head, classifier = heads()
    _, aux_classifier = heads()
    for ours, theirs in zip(net.head.conv2d_list, head):
        assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    for name, ref in (("classifier", classifier), ("aux_classifier", aux_classifier)):
        for key, value in ref.state_dict().items():
            assert torch.equal(getattr(net, name).state_dict()[key], value), f"{name}/{key}"
    # what that means: default-initialised head biases (not zeros), an aux classifier of its own
    assert net.head.conv2d_list[0].bias.abs().min() > 0
    assert not torch.equal(net.aux_classifier.weight, net.classifier.weight)


@pytest.mark.slow
def test_imagenet_start_keeps_the_fresh_head(tmp_path):
    """``--resume ''``: backbone from the ImageNet file, head and classifiers untouched (fresh)."""
    import torchvision

    from engine.network import build_network
    from stages.options import parse_args

    resnet = torchvision.models.resnet101(weights=None)
    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(resnet.state_dict(), path)
    args = parse_args("phase1", "", ["--cpu", "--resume", "", "--imagenet", str(path)])
    torch.manual_seed(5)
    fresh = DecoupleNet(layer=1)
    torch.manual_seed(5)
    net = build_network(args, decoupled=True, aux=True)
    for stem in (net.source_stem, net.target_stem):
        assert torch.equal(stem[0].weight, resnet.conv1.weight)
    assert torch.equal(net.body[-1][-1].conv3.weight, resnet.layer4[-1].conv3.weight)
    for name in ("head", "classifier", "aux_classifier"):
        for key, value in getattr(fresh, name).state_dict().items():
            assert torch.equal(getattr(net, name).state_dict()[key], value), f"{name}/{key}"
    # a source-only start point (no aux group) copies the classifier into the aux classifier
    net.load_official(filled_sourceonly_checkpoint(layer=1))
    assert torch.equal(net.aux_classifier.weight, net.classifier.weight)


@pytest.mark.slow
def test_discriminators_load_from_a_full_phase1_file():
    """``D1_state_dict`` / ``D2_state_dict`` of a phase-1 file (``module.`` prefixes or not) go into
    the discriminators; a file without them loads nothing; a bad key is one error naming it."""
    from stages.phase1 import load_discriminators
    from tests.helpers import filled_full_phase1_checkpoint, with_module_prefix

    ckpt = filled_full_phase1_checkpoint(1)
    for source in (ckpt, with_module_prefix(ckpt)):
        d1, d2 = FCDiscriminator(256, 32), FCDiscriminator(19, 64)
        assert load_discriminators(source, {"D1": d1, "D2": d2}, "f.pth") == ["D1", "D2"]
        for name, d in (("D1", d1), ("D2", d2)):
            for key, value in d.state_dict().items():
                assert torch.equal(value, ckpt[f"{name}_state_dict"][key]), f"{name}/{key}"
    d1 = FCDiscriminator(256, 32)
    fresh = {k: v.clone() for k, v in d1.state_dict().items()}
    assert load_discriminators(filled_sourceonly_checkpoint(1), {"D1": d1}, "so.pth") == []
    assert all(torch.equal(v, d1.state_dict()[k]) for k, v in fresh.items())
    bad = {"D2_state_dict": {k: v for k, v in ckpt["D2_state_dict"].items() if k != "conv3.bias"}}
    with pytest.raises(CheckpointError, match=r"bad\.pth: missing key D2/conv3\.bias"):
        load_discriminators(bad, {"D2": FCDiscriminator(19, 64)}, "bad.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatch for D1/conv1\.weight"):  # a --layer 2 D1
        load_discriminators(ckpt, {"D1": FCDiscriminator(512, 32)}, "l2.pth")


@pytest.mark.slow
@pytest.mark.parametrize("layer, expected", [(0, ["layer2", "layer3", "layer4"]), (2, ["layer3", "layer4"])])
def test_activation_checkpointing_same_gradients_and_statistics(layer, expected):
    """--activation_checkpointing: the same outputs, gradients and batch-norm running statistics
    (updated once, not again in the recomputation), and far fewer tensors kept for the backward."""
    torch.manual_seed(0)
    plain = DecoupleNet(layer=layer, decoupled=False, aux=False).train()
    saver = DecoupleNet(layer=layer, decoupled=False, aux=False).train()
    saver.load_state_dict(plain.state_dict())
    assert saver.set_activation_checkpointing(True) == expected
    x = torch.rand(2, 3, 48, 64)
    kept = {"plain": 0, "saver": 0}  # elements of the tensors saved for the backward
    for name, net in (("plain", plain), ("saver", saver)):

        def pack(t: torch.Tensor, name: str = name) -> torch.Tensor:
            kept[name] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        (out.square().mean() + out.mean()).backward()
    for (k, p), q in zip(plain.named_parameters(), saver.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=f"gradient of {k}")
    for k, b in plain.state_dict().items():  # running_mean / running_var / num_batches_tracked
        torch.testing.assert_close(saver.state_dict()[k], b, rtol=0, atol=0, msg=f"buffer {k}")
    assert int(saver.body[-1][0].bn1.num_batches_tracked) == 1
    # layer 0: layer2..4 hold most of the activations; layer 2: layer3..4 still do
    assert kept["saver"] < 0.5 * kept["plain"], kept


FRESH_ORACLE = os.path.join(PARITY, "fresh_init_seed1234.json")  # the original's construction at seed 1234


def _matches_oracle(modules: dict[str, torch.nn.Module], expected: dict) -> None:
    """Per-tensor float64 sums (and leading values) against the original's fresh parts."""
    for group, module in modules.items():
        state = module.state_dict()
        assert expected[group], group
        for key, ref in expected[group].items():
            v = state[key].double()
            assert float(v.sum()) == pytest.approx(ref["sum"], rel=1e-12, abs=1e-12), f"{group}/{key}"
            assert float(v.abs().sum()) == pytest.approx(ref["abs_sum"], rel=1e-12), f"{group}/{key}"
            if "first" in ref:
                assert v.flatten()[:4].tolist() == ref["first"], f"{group}/{key}"


def _groups(net: DecoupleNet, **extra: torch.nn.Module) -> dict[str, torch.nn.Module]:
    parts = {"model_B2": net.target_stem, "model_B": net.body, "head": net.head, "classifier": net.classifier}
    if net.source_stem is not None:
        parts["model_B1"] = net.source_stem
    if net.aux_classifier is not None:
        parts["aux_classifier"] = net.aux_classifier
    return {**parts, **extra}


@pytest.mark.slow
def test_fresh_parts_draw_the_originals_values():
    """One seed, the original's values for every fresh part: phase 1's two ResNet-101s (the
    source stem from the first), D1, D2 (built between the ResNets and the head), the head,
    the classifier and the aux classifier (after a second, dropped head); phase 2's one
    ResNet, head and classifier. Oracle: the original's model/ and train_phase1.py /
    train_phase2.py network lines on the CPU at seed 1234."""
    with open(FRESH_ORACLE) as f:
        oracle = json.load(f)
    assert (oracle["seed"], oracle["layer"], oracle["num_classes"], oracle["hidden_dim"]) == (1234, 1, 19, 128)
    parts: dict[str, torch.nn.Module] = {}

    def discriminators() -> None:
        parts["D1"] = FCDiscriminator(256, ndf=32)
        parts["D2"] = FCDiscriminator(19, ndf=64)

    torch.manual_seed(1234)
    net = DecoupleNet(layer=1, after_backbone=discriminators)
    _matches_oracle(_groups(net, **parts), oracle["phase1"])
    assert set(oracle["phase1"]) == set(_groups(net, **parts))
    # the stems are two independent draws, as the original's two ResNets
    assert not torch.equal(net.source_stem[0].weight, net.target_stem[0].weight)
    torch.manual_seed(1234)
    net = DecoupleNet(layer=1, decoupled=False, aux=False)
    assert set(oracle["phase2"]) == set(_groups(net))
    _matches_oracle(_groups(net), oracle["phase2"])


@pytest.mark.slow
def test_phase1_stage_starts_from_the_originals_draws(tmp_path):
    """train_phase1.py's own path (seed_everything, then Phase1Stage.build) with ``--resume ''``:
    D1, D2, head, classifier and aux classifier start from the original's values at seed 1234
    (rank 0); the backbone comes from the ImageNet file."""
    import torchvision

    from engine.launch import seed_everything
    from stages.options import parse_args
    from stages.phase1 import Phase1Stage
    from utils.distributed import DistEnv

    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), path)
    with open(FRESH_ORACLE) as f:
        oracle = json.load(f)["phase1"]
    args = parse_args("phase1", "", ["--cpu", "--resume", "", "--imagenet", str(path), "--random-seed", "1234"])
    seed_everything(args.random_seed, 0)
    stage = Phase1Stage(args, DistEnv())
    stage.build()
    net = stage.net
    _matches_oracle({"D1": stage.d1, "D2": stage.d2, "head": net.head, "classifier": net.classifier,
                     "aux_classifier": net.aux_classifier}, oracle)
