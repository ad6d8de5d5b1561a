"""The whole pipeline, end to end, on generated data: a first look without any download.

    bash scripts/demo.sh                 # sets up .venv if needed, then runs this
    python3 scripts/demo.py [--out demo_out] [--quick] [--steps N] [--imagenet PATH]

1. generates small street-like GTA5-layout (source) and Cityscapes-layout (target) trees with
   ``python3 -m datasets.synthetic`` (the two domains differ in colours, lighting, noise, blur);
2. writes a ResNet-101 file in the ImageNet (torchvision) format with a **random
   initialisation**: real ImageNet weights cannot be downloaded here. Pass ``--imagenet
   pretrained/resnet101-5d3b4d8f.pth`` to start from the real ones;
3. runs the real scripts, each as its own process, exactly as one would on the real data:
   ``train_source_only.py`` -> ``train_phase1.py --resume sourceonly.pth`` ->
   ``generate_soft_label.py`` -> ``datasets/get_thresholds.py 0.8 soft_labels`` (run inside the
   demo folder, so its output lands there) -> ``train_phase2.py`` -> ``evaluate.py`` on the
   final checkpoint of every stage;
4. prints the target-val mIoU of every stage, writes ``miou.md`` / ``miou.json`` and a figure
   (per-stage mIoU bars + image | ground truth | source-only | phase 1 | phase 2) to
   ``<out>/demo.png`` and, for a full run with the default ``--out``, to ``figs/demo.png``.

Runs on the GPU when ``torch.cuda.is_available()``, else with ``--cpu``. The numbers are what
this short run gives on toy data from a random start: they show that the stages run and hand
over to each other, not the paper's 53.1 mIoU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


@dataclass
class Config:
    size: tuple[int, int]  # W,H of the generated images (and of training / evaluation)
    crop: tuple[int, int]  # random crop W,H
    num_source: int
    num_target_train: int
    num_target_val: int
    batch: int
    steps: tuple[int, int, int]  # source-only, phase 1, phase 2
    lr: tuple[float, float, float]
    samples: int  # val images shown in the figure


# From a random start the original's lr (2.5e-4, head 10x) learns too slowly for a short demo; 1e-3
# (head 1e-2) is stable with the zero-initialised residual branches below, 1e-2 and 2.5e-3 diverge.
FULL = Config(size=(160, 80), crop=(96, 48), num_source=48, num_target_train=24, num_target_val=12, batch=2,
              steps=(100, 40, 40), lr=(1e-3, 1e-3, 1e-3), samples=3)
QUICK = Config(size=(64, 32), crop=(64, 32), num_source=4, num_target_train=2, num_target_val=2, batch=2,
               steps=(2, 2, 2), lr=(1e-3, 1e-3, 1e-3), samples=1)

STAGES = ("source-only", "phase 1", "phase 2")


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say("=" * 78)
    say(text)
    say("=" * 78)


class Runner:
    """Runs one script as a subprocess, logs its output to a file, stops the demo on failure."""

    def __init__(self, out: str, verbose: bool) -> None:
        self.out = out
        self.log_dir = os.path.join(out, "logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.verbose = verbose
        self.times: dict[str, float] = {}

    def __call__(self, name: str, args: list[str], cwd: str = REPO) -> None:
        cmd = [sys.executable, *args]
        shown = " ".join(a if " " not in a else repr(a) for a in args)
        say(f"\n[{name}] python3 {shown}")
        log_path = os.path.join(self.log_dir, f"{name.replace(' ', '_')}.log")
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if self.verbose:
                    sys.stdout.write("    " + line)
            rc = proc.wait()
        dt = time.time() - t0
        self.times[name] = dt
        if rc != 0:
            with open(log_path, encoding="utf-8") as f:
                tail = f.readlines()[-30:]
            say("".join("    " + t for t in tail))
            say(f"[{name}] FAILED (exit code {rc}) after {dt:.0f}s; full log: {log_path}")
            sys.exit(1)
        say(f"[{name}] done in {dt:.0f}s (log: {os.path.relpath(log_path, self.out)})")


def common_flags(cfg: Config, data: str, device_flags: list[str], workers: int) -> list[str]:
    w, h = cfg.size
    return [
        *device_flags, "--quiet", "--num-workers", str(workers),
        "--src_rootpath", os.path.join(data, "gta5"), "--tgt_rootpath", os.path.join(data, "cityscapes"),
        "--src_img_size", f"{w},{h}", "--tgt_img_size", f"{w},{h}",
        "--resize", str(w), "--rcrop", f"{cfg.crop[0]},{cfg.crop[1]}",
        "--batch_size_val", "2", "--print-every", "10",
    ]


def train_flags(cfg: Config, i: int) -> list[str]:
    n = cfg.steps[i]
    return ["--batch-size", str(cfg.batch), "--num-steps", str(n), "--num-steps-stop", str(n),
            "--save-pred-every", str(n), "--learning-rate", str(cfg.lr[i])]


def random_resnet101(path: str) -> None:
    """torchvision's ResNet-101, randomly initialised, saved in the ImageNet file format.

    ``zero_init_residual=True`` (each block's last BatchNorm starts at 0, so every residual
    block starts as the identity) keeps a 101-layer network trainable from scratch at the
    demo's learning rate; with torchvision's plain default init the loss diverges.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet101(weights=None, zero_init_residual=True).state_dict()
    torch.save(state, path)


# ------------------------------------------------------------------------------------------------ figure
def _tile(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    return cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def draw_figure(path: str, results: dict[str, dict], sample_rows: list[list[np.ndarray]], note: str) -> None:
    """Bar chart of the per-stage mIoU above rows of image | GT | source-only | phase 1 | phase 2."""
    from PIL import Image, ImageDraw

    spec = importlib.util.spec_from_file_location("draw_pipeline", os.path.join(REPO, "scripts", "draw_pipeline.py"))
    dp = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(dp)

    tile_w, tile_h, gap = 256, 128, 10
    cols = ["image", "ground truth", *STAGES]
    width = 40 + len(cols) * tile_w + (len(cols) - 1) * gap + 40
    chart_h = 330
    rows_h = len(sample_rows) * (tile_h + gap) + 40
    probe = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    note_lines, line = [], ""
    for word in note.split():
        trial = f"{line} {word}".strip()
        if line and probe.textlength(trial, font=dp.font(16)) > width - 80:
            note_lines.append(line)
            trial = word
        line = trial
    note_lines.append(line)
    height = 70 + chart_h + rows_h + 20 + 24 * len(note_lines)
    img = Image.new("RGB", (width, height), dp.WHITE)
    d = ImageDraw.Draw(img)
    d.text((width / 2, 30), "DecoupleNet demo on synthetic GTA5 \u2192 Cityscapes data", font=dp.font(26, True),
           fill=dp.INK, anchor="mm")
    # bar chart
    x0, y0, x1, y1 = 120, 90, width - 60, 70 + chart_h - 50
    values = [100.0 * results[s]["miou"] for s in STAGES]
    top = max(10.0, float(np.ceil(max(values) / 10.0) * 10.0))
    d.line([(x0, y1), (x1, y1)], fill=dp.INK, width=2)
    d.line([(x0, y0), (x0, y1)], fill=dp.INK, width=2)
    step = 5 if top <= 30 else 10
    for v in range(0, int(top) + 1, step):
        y = y1 - (y1 - y0) * v / top
        d.line([(x0 - 6, y), (x0, y)], fill=dp.INK, width=2)
        d.line([(x0 + 1, y), (x1, y)], fill=(232, 232, 232), width=1)
        d.text((x0 - 10, y), f"{v}", font=dp.font(16), fill=dp.INK, anchor="rm")
    d.text((40, (y0 + y1) / 2), "mIoU\n(%)", font=dp.font(17, True), fill=dp.INK, anchor="mm", align="center")
    colours = [dp.SOURCE_EDGE, dp.STAGE_EDGE, dp.TARGET_EDGE]
    slot = (x1 - x0) / len(STAGES)
    for i, (stage, v) in enumerate(zip(STAGES, values)):
        bx0 = x0 + slot * i + slot * 0.25
        bx1 = x0 + slot * (i + 1) - slot * 0.25
        by = y1 - (y1 - y0) * v / top
        d.rectangle((bx0, by, bx1, y1 - 1), fill=colours[i])
        d.text(((bx0 + bx1) / 2, by - 14), f"{v:.1f}", font=dp.font(20, True), fill=dp.INK, anchor="mm")
        d.text(((bx0 + bx1) / 2, y1 + 20), f"{stage} ({results[stage]['steps']} it)", font=dp.font(18),
               fill=dp.INK, anchor="mm")
    # sample rows
    ry = 70 + chart_h
    for j, name in enumerate(cols):
        d.text((40 + j * (tile_w + gap) + tile_w / 2, ry + 14), name, font=dp.font(18, True), fill=dp.INK,
               anchor="mm")
    ry += 32
    for row in sample_rows:
        for j, tile in enumerate(row):
            img.paste(Image.fromarray(tile), (40 + j * (tile_w + gap), ry))
        ry += tile_h + gap
    for i, text in enumerate(note_lines):
        d.text((width / 2, ry + 14 + 24 * i), text, font=dp.font(16), fill=dp.MUTED, anchor="mm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, optimize=True)


def sample_rows(data: str, out: str, count: int) -> list[list[np.ndarray]]:
    """image | ground truth | prediction of each stage, for the first ``count`` val images."""
    import cv2

    from datasets.cityscapes import CityscapesDataset
    from datasets.gta5 import read_image, read_label_ids
    from datasets.labels import colorize, encode_labels

    ds = CityscapesDataset(os.path.join(data, "cityscapes"), split="val", img_size=(64, 64))
    rows = []
    for path in ds.files[:count]:
        name = os.path.basename(path)
        img = read_image(path)
        gt = colorize(encode_labels(read_label_ids(ds.label_path(path))))
        row = [_tile(img, (256, 128), False), _tile(gt, (256, 128), True)]
        for stage in STAGES:
            pred = cv2.imread(os.path.join(out, "eval", _slug(stage), "preds", "trainid", name), cv2.IMREAD_GRAYSCALE)
            row.append(_tile(colorize(pred), (256, 128), True))
        rows.append(row)
    return rows


def pseudo_summary(snapshot: str) -> dict | None:
    """Pseudo-label accuracy of one training run from its ``metrics.jsonl`` (None without ground truth).

    ``acc``: pooled over the run (correct / scored pixels, all iterations); ``first`` / ``last``:
    pooled over the first / last quarter of the iterations; ``kept``: mean kept fraction.
    """
    path = os.path.join(snapshot, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or "pseudo_acc" not in rows[0]:
        return None

    def pooled(part: list[dict]) -> float | None:
        n = sum(r["pseudo_acc_pixels"] for r in part)
        return sum(r["pseudo_acc"] * r["pseudo_acc_pixels"] for r in part if r["pseudo_acc"] is not None) / n if n else None

    q = max(1, len(rows) // 4)
    return {"acc": pooled(rows), "first": pooled(rows[:q]), "last": pooled(rows[-q:]),
            "kept": sum(r["pseudo_kept"] for r in rows) / len(rows), "per_iteration": [r["pseudo_acc"] for r in rows]}


def soft_label_miou(log_path: str) -> float | None:
    """The soft labels' mIoU against the target train ground truth, from generate_soft_label.py's log."""
    import re

    with open(log_path, encoding="utf-8") as f:
        text = f.read()
    if "vs train ground truth" not in text:
        return None
    found = re.findall(r"^mIoU\s+([0-9.]+)\s*$", text.split("vs train ground truth", 1)[1], re.MULTILINE)
    return float(found[0]) / 100.0 if found else None


def _slug(stage: str) -> str:
    return stage.replace(" ", "").replace("-", "_")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="working folder (default ./demo_out)")
    parser.add_argument("--quick", action="store_true", help="tiny run (a couple of minutes on a CPU): for tests")
    parser.add_argument("--steps", type=int, default=None,
                        help="iterations of each training stage (default: 150 source-only, 60 phase 1, 60 phase 2; "
                             "--quick: 2)")
    parser.add_argument("--imagenet", default="", help="real ImageNet ResNet-101 file (default: random init)")
    parser.add_argument("--figure", default=None,
                        help="figure path (default: figs/demo.png for a full run into ./demo_out, else <out>/demo.png)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--keep_states", action="store_true", help="keep the training states latest.pth (large)")
    parser.add_argument("--verbose", action="store_true", help="show the scripts' output")
    args = parser.parse_args(argv)

    import torch

    cfg = QUICK if args.quick else FULL
    if args.steps is not None:
        if args.steps <= 0:
            parser.error("--steps must be positive")
        cfg = dataclasses.replace(cfg, steps=(args.steps,) * 3)
    out = os.path.abspath(args.out)
    default_out = out == os.path.abspath(os.path.join(REPO, "demo_out"))
    figure = args.figure or (os.path.join(REPO, "figs", "demo.png") if default_out and not args.quick
                             else os.path.join(out, "demo.png"))
    gpu = torch.cuda.is_available() and not args.cpu
    device_flags = ["--gpus", "0"] if gpu else ["--cpu"]
    workers = min(4, os.cpu_count() or 1) if gpu else 0
    t_start = time.time()

    banner("DecoupleNet demo: synthetic GTA5 -> Cityscapes, every stage of the pipeline")
    say(f"working folder: {out}")
    say(f"device: {'CUDA (' + torch.cuda.get_device_name(0) + ')' if gpu else 'CPU (--cpu)'}; "
        f"images {cfg.size[0]}x{cfg.size[1]}, crops {cfg.crop[0]}x{cfg.crop[1]}, batch {cfg.batch}; "
        f"iterations: source-only {cfg.steps[0]}, phase 1 {cfg.steps[1]}, phase 2 {cfg.steps[2]}")
    if os.path.isdir(out):
        for sub in ("data", "runs", "eval", "soft_labels", "logs", "pretrained"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    run = Runner(out, args.verbose)

    # 1. data
    data = os.path.join(out, "data")
    run("data", ["-m", "datasets.synthetic", "--out", data, "--size", f"{cfg.size[0]},{cfg.size[1]}",
                 "--num_source", str(cfg.num_source), "--num_target_train", str(cfg.num_target_train),
                 "--num_target_val", str(cfg.num_target_val)])

    # 2. backbone file
    if args.imagenet:
        imagenet = os.path.abspath(args.imagenet)
        init_note = f"backbone: ImageNet weights from {args.imagenet}"
        say(f"\n[backbone] {init_note}")
    else:
        os.makedirs(os.path.join(out, "pretrained"), exist_ok=True)
        imagenet = os.path.join(out, "pretrained", "resnet101_random_init.pth")
        random_resnet101(imagenet)
        init_note = "backbone: RANDOM initialisation (no ImageNet weights; none can be downloaded here)"
        say("\n[backbone] NOTE: real ImageNet weights cannot be downloaded here, so the demo starts from a")
        say("           RANDOMLY INITIALISED ResNet-101 written in the ImageNet file format:")
        say(f"           {os.path.relpath(imagenet, out)} (torchvision init, residual branches")
        say("           zero-initialised, seed 0). Real runs start from pretrained/resnet101-5d3b4d8f.pth")
        say("           (here: --imagenet PATH).")

    base = common_flags(cfg, data, device_flags, workers)
    runs = os.path.join(out, "runs")
    ckpts: dict[str, str] = {}

    # 3. the stages
    snap = os.path.join(runs, "source_only")
    run("source-only", ["train_source_only.py", *base, *train_flags(cfg, 0), "--imagenet", imagenet,
                        "--snapshot-dir", snap])
    ckpts["source-only"] = os.path.join(snap, "sourceonly.pth")

    snap = os.path.join(runs, "phase1")
    run("phase 1", ["train_phase1.py", *base, *train_flags(cfg, 1), "--resume", ckpts["source-only"],
                    "--snapshot-dir", snap])
    ckpts["phase 1"] = os.path.join(snap, f"GTA5_{cfg.steps[1]}.pth")

    soft = os.path.join(out, "soft_labels")
    run("soft labels", ["generate_soft_label.py", *base, "--resume", ckpts["phase 1"], "--output_folder", soft,
                        "--no_droplast", "--snapshot-dir", os.path.join(runs, "soft_labels")])

    run("thresholds", [os.path.join(REPO, "datasets", "get_thresholds.py"), "0.8", "soft_labels", "--quiet"], cwd=out)
    thresholds = os.path.join(out, "soft_labels_thresholds_p0.8.npy")

    snap = os.path.join(runs, "phase2")
    run("phase 2", ["train_phase2.py", *base, *train_flags(cfg, 2), "--resume", ckpts["phase 1"],
                    "--soft_labels_folder", soft, "--thresholds_path", thresholds, "--snapshot-dir", snap])
    ckpts["phase 2"] = os.path.join(snap, f"GTA5_{cfg.steps[2]}.pth")

    # 4. evaluation of every stage
    results: dict[str, dict] = {}
    for i, stage in enumerate(STAGES):
        folder = os.path.join(out, "eval", _slug(stage))
        res_json = os.path.join(out, "eval", f"{_slug(stage)}.json")
        run(f"evaluate {stage}", ["evaluate.py", *base, "--resume", ckpts[stage], "--snapshot-dir", folder,
                                  "--results_json", res_json, "--save_dir", os.path.join(folder, "preds")])
        with open(res_json, encoding="utf-8") as f:
            res = json.load(f)
        results[stage] = {"miou": res["miou"], "iou": res["iou"], "steps": cfg.steps[i],
                          "checkpoint": os.path.relpath(ckpts[stage], out),
                          "train_seconds": round(run.times[stage], 1)}

    if not args.keep_states:  # training states (hundreds of MB each) and the source-only copy in phase-2 layout
        for p in [os.path.join(runs, d, "latest.pth") for d in ("source_only", "phase1", "phase2")] + [
                os.path.join(runs, "source_only", f"GTA5_{cfg.steps[0]}.pth")]:
            if os.path.exists(p):
                os.unlink(p)

    # 5. table, files, figure
    total = time.time() - t_start
    lines = ["| stage | iterations | training time (s) | checkpoint | target-val mIoU (%) |",
             "|---|---:|---:|---|---:|"]
    for stage in STAGES:
        r = results[stage]
        lines.append(f"| {stage} | {r['steps']} | {r['train_seconds']:.0f} | `{r['checkpoint']}` | "
                     f"{100 * r['miou']:.2f} |")
    table = "\n".join(lines)
    device_text = "CUDA" if gpu else "CPU"
    footer = (f"{init_note}; synthetic data {cfg.size[0]}x{cfg.size[1]}, {cfg.num_source} source / "
              f"{cfg.num_target_train} target-train / {cfg.num_target_val} target-val images; {device_text}; "
              f"whole demo {total:.0f}s")
    banner("target-val mIoU per stage (evaluate.py, 19 classes)")
    say(table)
    say()
    say(footer)
    with open(os.path.join(out, "miou.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + footer + "\n")
    with open(os.path.join(out, "miou.json"), "w", encoding="utf-8") as f:
        json.dump({"stages": results, "seconds": round(total, 1), "device": device_text, "init": init_note,
                   "config": {k: v for k, v in vars(cfg).items()}}, f, indent=2)
    note = (f"{init_note}. Toy data, short schedules ({'/'.join(str(s) for s in cfg.steps)} iterations): "
            "the numbers show the stages run and hand over, not the paper's result.")
    draw_figure(os.path.join(out, "demo.png"), results, sample_rows(data, out, cfg.samples), note)
    if os.path.abspath(figure) != os.path.join(out, "demo.png"):
        os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
        shutil.copyfile(os.path.join(out, "demo.png"), figure)
    say(f"\nfigure: {figure}\ntable: {os.path.join(out, 'miou.md')}\ntotal time: {total:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
