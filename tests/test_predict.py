"""``predict.py`` and ``export.py`` (docs/INFERENCE.md): the predictions equal ``evaluate.py
--save_dir``'s on the generated Cityscapes val split; folders, globs, videos, unreadable files and
bad inputs; the ONNX model's logits against PyTorch's float32 forward; ``predict.py --onnx``
predicting the same without importing torch; the NumPy test-time augmentation against PyTorch's."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.errors import DatasetError
from datasets.images import find_inputs
from datasets.labels import colorize, overlay
from engine.validation import tta_probabilities
from model import DecoupleNet, upsample
from stages import prediction
from stages.prediction_onnx import NUMPY_TTA_OPS, resize_bilinear
from tests.conftest import IMG_H, IMG_W, run_script, tiny_args
from tests.helpers import filled_phase1_checkpoint, well_conditioned
from utils.files import atomic_path
from utils.tta import combine_passes, scaled_size

PHASE2_GROUPS = ("model_B2_state_dict", "model_B_state_dict", "head_state_dict", "classifier_state_dict")


def read_png(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, f"{path}: not written"
    return arr


def val_images(data: dict) -> list[Path]:
    return sorted((Path(data["cityscapes"]) / "leftImg8bit" / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``{"phase1": path, "phase2": path, "phase2_wc": path}``: the filled weights (tests/helpers.py)
    in our phase-1 layout and in the original's phase-2 layout (target stem, body, head,
    classifier); ``phase2_wc``: those of the well-conditioned parity fixtures (every
    ``bn3.weight`` x 0.1: logits of order 1 instead of 50, so that float32 rounding through
    ResNet-101 stays far below the 1e-4 of the ONNX check), which the ONNX models are made of."""
    folder = tmp_path_factory.mktemp("predict_ckpt")
    ckpt = filled_phase1_checkpoint(DecoupleNet())
    paths = {"phase1": folder / "phase1.pth", "phase2": folder / "phase2.pth", "phase2_wc": folder / "phase2_wc.pth"}
    torch.save(ckpt, paths["phase1"])
    torch.save(OrderedDict((k, ckpt[k]) for k in PHASE2_GROUPS), paths["phase2"])
    copy = OrderedDict((k, OrderedDict((n, v.clone()) for n, v in ckpt[k].items())) for k in PHASE2_GROUPS)
    torch.save(well_conditioned(copy), paths["phase2_wc"])
    yield paths
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def onnx_models(checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """``export.py`` of the well-conditioned phase-2 checkpoint: ``static`` at 128x64,
    ``static_small`` at 80x48 and ``dynamic`` (``--dynamic --argmax``, exported at 96x48)."""
    folder = tmp_path_factory.mktemp("onnx")
    models = {"static": (folder / "static.onnx", ["--size", "128,64"]),
              "static_small": (folder / "static_small.onnx", ["--size", "80,48"]),
              "dynamic": (folder / "dynamic.onnx", ["--size", "96,48", "--dynamic", "--argmax"])}
    for path, flags in models.values():
        proc = run_script(["export.py", "--resume", checkpoints["phase2_wc"], "--out", path, *flags])
        assert re.search(rf"export: {re.escape(str(path))} \(\d+ MiB\): input image float32", proc.stdout)
    yield {name: path for name, (path, _) in models.items()}
    shutil.rmtree(folder, ignore_errors=True)


def reference_net(checkpoint: Path) -> DecoupleNet:
    net = DecoupleNet(decoupled=False, aux=False)
    net.load_official(torch.load(checkpoint, weights_only=True))
    return net.eval()


# ---------------------------------------------------------------------------- NumPy against PyTorch
@pytest.mark.parametrize(("src", "dst"), [((8, 16), (64, 128)), ((64, 128), (37, 61)), ((5, 7), (5, 7)),
                                          ((1, 9), (4, 3)), ((6, 6), (1, 1))])
def test_numpy_bilinear_resize_is_torchs_align_corners(src, dst) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=True).numpy()
    got = resize_bilinear(x, dst)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_numpy_rescale_sizes_are_torchs_scale_factor_sizes() -> None:
    for hw in ((48, 96), (64, 128), (37, 61), (1024, 2048)):
        for s in (0.5, 0.75, 1.25, 1.5, 1.75, 2.0, 0.3):
            out = F.interpolate(torch.zeros(1, 1, *hw), scale_factor=s, mode="bilinear", align_corners=True)
            assert scaled_size(hw, s) == tuple(out.shape[-2:]), (hw, s)


def test_numpy_tta_is_pytorchs_tta() -> None:
    """:func:`utils.tta.combine_passes` with the NumPy operations of the ONNX path gives the scores
    of ``engine.validation.tta_probabilities`` for the same network (scales, flip, plain pass)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4),
                              torch.nn.Conv2d(8, 19, 3, padding=1)).eval()
    with torch.no_grad():
        net[3].weight.mul_(30.0)

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    rng = np.random.default_rng(1)
    img = rng.random((2, 3, 40, 72), dtype=np.float32)
    img[..., :36] /= 3  # not mirror-symmetric
    for scales, flip in (((1.0,), False), ((1.0,), True), ((0.75, 1.0, 1.25), True), ((0.5, 1.5), False)):
        with torch.no_grad():
            want = tta_probabilities(net, torch.from_numpy(img), (50, 90), "off", torch.device("cpu"), scales, flip)
        got = combine_passes(img, (50, 90), forward, NUMPY_TTA_OPS, scales=scales, flip=flip)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{scales} {flip}")
        assert (got.argmax(1) == want.argmax(1).numpy()).mean() > 0.999


# ---------------------------------------------------------------------------- inputs, outputs, files
def test_find_inputs_reads_folders_globs_files_and_videos(tmp_path: Path) -> None:
    for rel in ("b/z.png", "a/y.jpg", "a/x.PNG", "top.png", "notes.txt", "clip.avi"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    folder = find_inputs(str(tmp_path))  # recursive, sorted, images only
    assert [f.name for f in folder] == [os.path.join("a", "x"), os.path.join("a", "y"), os.path.join("b", "z"), "top"]
    assert not any(f.video for f in folder)
    globbed = find_inputs(str(tmp_path / "*.*"))
    assert [(os.path.basename(f.path), f.name, f.video) for f in globbed] == [
        ("clip.avi", "clip", True), ("notes.txt", "notes", False), ("top.png", "top", False)]
    (single,) = find_inputs(str(tmp_path / "a" / "y.jpg"))
    assert single.name == "y" and not single.video
    assert find_inputs(str(tmp_path / "clip.avi"))[0].video
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "b" / "z.jpg").write_bytes(b"x")
    for spec, message in ((tmp_path / "missing", "no such file or folder"), (tmp_path / "empty", "no image in the folder"),
                          (tmp_path / "*.nothing", "no file matches the pattern"),
                          (tmp_path / "b", "would write the same outputs")):
        with pytest.raises(DatasetError, match=re.escape(f"--input {spec}: ") + ".*" + message):
            find_inputs(str(spec))


def test_atomic_path_renames_into_place_or_leaves_the_old_file(tmp_path: Path) -> None:
    """The writer of the overlay videos: a temporary name with the file's extension (OpenCV picks
    the container by it), an ordinary file mode, renamed only when the block ends without error."""
    dest = tmp_path / "clip.avi"
    with atomic_path(dest) as tmp:
        assert tmp.endswith(".avi") and os.path.basename(tmp).startswith(".clip.avi.")
        Path(tmp).write_bytes(b"new")
        assert not dest.exists()
    assert dest.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["clip.avi"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert dest.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["clip.avi"]


def test_overlay_blends_the_palette_over_the_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    ids = rng.integers(0, 19, (6, 9)).astype(np.uint8)
    assert np.array_equal(overlay(image, ids, alpha=0.0), image)
    assert np.array_equal(overlay(image, ids, alpha=1.0), colorize(ids))
    want = np.rint(0.7 * image.astype(np.float64) + 0.3 * colorize(ids)).astype(np.uint8)
    assert np.abs(overlay(image, ids, alpha=0.3).astype(int) - want).max() <= 1


def test_bad_inputs_give_one_line_and_exit_2(tmp_path: Path, capsys, checkpoints) -> None:
    """A missing input, a folder without images, a bad flag, a missing or unreadable model: one
    ``error:`` line naming the flag, exit code 2, no output folder."""
    (tmp_path / "empty").mkdir()
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 16)).save(image)
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    out = tmp_path / "out"
    cases = [
        (["--resume", "x.pth", "--input", str(tmp_path / "missing")], "--input"),
        (["--resume", "x.pth", "--input", str(tmp_path / "empty")], "--input"),
        (["--resume", "x.pth", "--input", str(image), "--size", "64"], "--size"),
        (["--resume", "x.pth", "--input", str(image), "--scales", "1,-1"], "--scales"),
        (["--resume", "x.pth", "--input", str(image), "--batch_size", "0"], "--batch_size"),
        (["--input", str(image)], "--resume / --onnx"),
        (["--resume", "x.pth", "--onnx", "m.onnx", "--input", str(image)], "--resume / --onnx"),
        (["--onnx", "m.onnx", "--inference_amp", "bf16", "--input", str(image)], "--inference_amp"),
        (["--onnx", str(tmp_path / "missing.onnx"), "--input", str(image)], "--onnx"),
        (["--onnx", str(tmp_path / "garbage.onnx"), "--input", str(image)], "--onnx"),
        (["--resume", str(tmp_path / "missing.pth"), "--input", str(image)], "--resume"),
    ]
    for argv, flag in cases:
        assert prediction.main([*argv, "--output", str(out), "--cpu", "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {flag}"), (argv, err)
        assert not out.exists(), argv


# ---------------------------------------------------------------------------- predict.py end to end
@pytest.mark.slow
def test_predictions_equal_evaluate_save_dir(synthetic_data, checkpoints, tmp_path: Path) -> None:
    """On the generated Cityscapes val split, with the same checkpoint, size, flip and scales,
    ``predict.py``'s label and colour PNGs are ``evaluate.py --save_dir``'s trainid and colour
    PNGs, pixel for pixel (at the images' own size, not the network's 96x48)."""
    opts = ["--flip", "--scales", "0.75,1.0"]
    run_script(["evaluate.py", *tiny_args(synthetic_data), "--tgt_img_size", "96,48", "--num-workers", "0",
                "--resume", checkpoints["phase1"], "--save_dir", tmp_path / "eval", "--snapshot-dir",
                tmp_path / "snap", *opts])
    proc = run_script(["predict.py", "--resume", checkpoints["phase1"], "--cpu", "--quiet", "--size", "96,48",
                       "--batch_size", "2", "--input", Path(synthetic_data["cityscapes"]) / "leftImg8bit" / "val",
                       "--output", tmp_path / "pred", *opts])
    images = val_images(synthetic_data)
    assert f"predict: {len(images)} image(s) written, 0 skipped" in proc.stdout
    classes = set()
    for img in images:
        city = img.parent.name
        label = read_png(tmp_path / "pred" / "label" / city / img.name)
        assert label.shape == (IMG_H, IMG_W) and label.dtype == np.uint8
        np.testing.assert_array_equal(label, read_png(tmp_path / "eval" / "trainid" / img.name))
        np.testing.assert_array_equal(read_png(tmp_path / "pred" / "color" / city / img.name),
                                      read_png(tmp_path / "eval" / "color" / img.name))
        classes |= set(np.unique(label).tolist())
    assert len(classes) >= 3  # a real prediction, not one class everywhere


@pytest.mark.slow
def test_predict_folder_writes_label_color_overlay_and_skips_unreadable(synthetic_data, checkpoints,
                                                                        tmp_path: Path) -> None:
    """A folder (recursive): label/color/overlay PNGs at each image's own size, mirroring the
    sub-folders; an unreadable image gets one warning line and is skipped; the summary counts."""
    src = tmp_path / "photos"
    (src / "street").mkdir(parents=True)
    first, second = val_images(synthetic_data)
    shutil.copy(first, src / "street" / "a.png")
    Image.open(second).resize((100, 70), Image.BILINEAR).save(src / "b.jpg", quality=95)  # another size, a JPEG
    shutil.copy(second, src / "c.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "notes.txt").write_text("not an image")
    proc = run_script(["predict.py", "--resume", checkpoints["phase2"], "--cpu", "--size", "96,48",
                       "--batch_size", "2", "--input", src, "--output", tmp_path / "out"])
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [f"warning: {src / 'broken.png'}: cannot read image (corrupt or not an image); skipped"]
    assert "predict: 3 image(s) written, 1 skipped" in proc.stdout
    assert "predict:" in proc.stdout and "img" in proc.stdout  # the progress bar
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{d}/{n}.png" for d in ("label", "color", "overlay") for n in ("b", "c", "street/a"))
    for name, source in (("street/a", first), ("b", src / "b.jpg"), ("c", second)):
        image = np.asarray(Image.open(source).convert("RGB"))
        label = read_png(out / "label" / f"{name}.png")
        assert label.shape == image.shape[:2] and label.max() < 19
        np.testing.assert_array_equal(read_png(out / "color" / f"{name}.png"), colorize(label)[:, :, ::-1])
        np.testing.assert_array_equal(read_png(out / "overlay" / f"{name}.png"), overlay(image, label)[:, :, ::-1])


@pytest.mark.slow
def test_predict_video_writes_an_overlay_video(synthetic_data, checkpoints, tmp_path: Path) -> None:
    """A video gives an overlay video of the same frame count, frame rate and size; its frames are
    the overlays ``predict.py`` writes for the same frames as images (up to MJPG's compression)."""
    src = tmp_path / "in"
    src.mkdir()
    images = [cv2.imread(str(p)) for p in val_images(synthetic_data)]
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 12.5, (IMG_W, IMG_H))
    for i in range(5):
        writer.write(images[i % len(images)])
    writer.release()
    capture = cv2.VideoCapture(str(src / "clip.avi"))
    decoded = [capture.read()[1] for _ in range(5)]
    capture.release()
    for i, frame in enumerate(decoded[:2]):  # the same decoded frames, as images
        cv2.imwrite(str(src / f"frame{i}.png"), frame)
    proc = run_script(["predict.py", "--resume", checkpoints["phase2"], "--cpu", "--quiet", "--size", "96,48",
                       "--batch_size", "2", "--input", src / "*", "--output", tmp_path / "out"])
    assert "predict: 2 image(s) written, 0 skipped; 1 video(s) written (5 frames)" in proc.stdout
    capture = cv2.VideoCapture(str(tmp_path / "out" / "overlay" / "clip.avi"))
    assert capture.isOpened()
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.5)
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (IMG_W, IMG_H)
    frames = [capture.read()[1] for _ in range(5)]
    capture.release()
    for i in range(2):
        want = read_png(tmp_path / "out" / "overlay" / f"frame{i}.png").astype(float)
        assert np.abs(frames[i] - want).mean() < 4, i  # MJPG's loss only
        assert np.abs(decoded[i] - want).mean() > 10, i  # the colours are there
    assert not list((tmp_path / "out" / "overlay").glob(".*"))  # no temporary file left


# ---------------------------------------------------------------------------- export.py, onnxruntime
@pytest.mark.slow
def test_onnx_logits_match_pytorch_float32(checkpoints, onnx_models) -> None:
    """onnxruntime (CPU) on the exported models gives PyTorch's float32 logits of the target branch
    (upsampled to the input size, align_corners=True) within 1e-4, with the filled weights: at
    128x64 and 80x48, and with --dynamic at sizes other than the exported 96x48; --argmax's label
    is the argmax of the logits."""
    import onnxruntime as ort

    net = reference_net(checkpoints["phase2_wc"])
    rng = np.random.default_rng(0)
    for name, shape in (("static", (2, 3, 64, 128)), ("static_small", (1, 3, 48, 80)),
                        ("dynamic", (2, 3, 56, 112)), ("dynamic", (1, 3, 40, 72))):
        session = ort.InferenceSession(str(onnx_models[name]), providers=["CPUExecutionProvider"])
        x = rng.random(shape, dtype=np.float32)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))
        with torch.no_grad():
            logits8 = net(torch.from_numpy(x))
            logits = upsample(logits8, shape[-2:]).numpy()
        assert outputs["logits"].shape == (shape[0], 19, *shape[-2:]), name
        assert np.abs(logits).max() > 0.5 and logits.argmax(1).std() > 0  # not a degenerate network
        np.testing.assert_allclose(outputs["logits"], logits, rtol=0, atol=1e-4, err_msg=f"{name} {shape}")
        np.testing.assert_allclose(outputs["logits_stride8"], logits8.numpy(), rtol=0, atol=1e-4)
        if name == "dynamic":
            np.testing.assert_array_equal(outputs["label"], outputs["logits"].argmax(1))
        else:
            assert "label" not in outputs


@pytest.mark.slow
def test_predict_onnx_imports_no_torch_and_predicts_as_pytorch(synthetic_data, checkpoints, onnx_models,
                                                               tmp_path: Path) -> None:
    """``predict.py --onnx`` (flip and scales on the dynamic model) writes the PyTorch path's
    predictions, and no torch module is loaded in its process at any point of the run."""
    val = Path(synthetic_data["cityscapes"]) / "leftImg8bit" / "val"
    opts = ["--cpu", "--quiet", "--size", "96,48", "--batch_size", "2", "--flip", "--scales", "0.75,1.0", "--input", val]
    run_script(["predict.py", "--resume", checkpoints["phase2_wc"], "--output", tmp_path / "torch", *opts])
    probe = ("import atexit, json, runpy, sys\n"
             "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules))))\n"
             "sys.argv = ['predict.py'] + sys.argv[1:]\n"
             "runpy.run_path('predict.py', run_name='__main__')\n")
    proc = run_script(["-c", probe, "--onnx", onnx_models["dynamic"], "--output", tmp_path / "onnx", *opts])
    modules = json.loads(proc.stdout.split("MODULES ", 1)[1])
    assert "onnxruntime" in modules and "stages.prediction_onnx" in modules  # the probe saw the real run
    assert [m for m in modules if m == "torch" or m.startswith("torch.")] == []
    assert f"predict: {len(val_images(synthetic_data))} image(s) written" in proc.stdout
    for img in val_images(synthetic_data):
        for folder in ("label", "color", "overlay"):
            got = read_png(tmp_path / "onnx" / folder / img.parent.name / img.name)
            want = read_png(tmp_path / "torch" / folder / img.parent.name / img.name)
            assert got.shape == want.shape
            assert (got == want).all(axis=-1 if got.ndim == 3 else None).mean() > 0.999, (folder, img.name)


@pytest.mark.slow
def test_predict_onnx_static_model_takes_its_own_size_only(synthetic_data, onnx_models, tmp_path: Path) -> None:
    """A model exported without --dynamic: --size defaults to its size; another --size, or another
    scale, is one error line naming the flag (exit 2)."""
    img = val_images(synthetic_data)[0]
    proc = run_script(["predict.py", "--onnx", onnx_models["static_small"], "--quiet", "--input", img,
                       "--output", tmp_path / "ok"])
    assert "predict: 1 image(s) written" in proc.stdout
    assert read_png(tmp_path / "ok" / "label" / img.name).shape == (IMG_H, IMG_W)
    for flags, flag in ((["--size", "96,48"], "--size 96,48"), (["--scales", "0.75,1.0"], "--scales")):
        proc = run_script(["predict.py", "--onnx", onnx_models["static_small"], "--input", img, "--output",
                           tmp_path / "bad", *flags], check=False)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {flag}:"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
