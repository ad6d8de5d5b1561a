"""The demo: ``pipeline.py recipes/demo.yaml`` on generated data, then its figure (docs/DEMO.md).

    bash scripts/demo.sh                 # sets up .venv if needed, then runs this
    python3 scripts/demo.py [--out demo_out] [--quick] [--seeds 1234] [pipeline.py flags ...]

1. ``pipeline.py recipes/demo.yaml`` (docs/PIPELINE.md) generates small street-like GTA5-layout
   (source) and Cityscapes-layout (target) trees (``python3 -m datasets.synthetic``), writes a
   ResNet-101 file in the ImageNet format with a **random initialisation**
   (``python3 -m model.random_backbone``: real ImageNet weights cannot be downloaded here), runs
   the real scripts, each as its own process: source-only -> phase 1 -> soft labels -> thresholds
   -> phase 2 -> ``evaluate.py`` on every training stage's best and final checkpoints, and writes
   ``<out>/report.md`` and ``report.json``: the target-val mIoU of every stage and the accuracy of
   the pseudo labels each stage trains on, against the target *train* ground truth, which the
   scripts read for monitoring only (``pseudo_acc`` in each run's ``metrics.jsonl``, never a loss).
2. draws the figure from ``report.json``: mIoU and pseudo-label accuracy bars, then image |
   ground truth | source-only | phase 1 | phase 2 for a few val images, into ``<out>/demo.png``
   and, for a full run into the default ``--out``, ``figs/demo.png``.

Runs on the GPU when torch sees one, else on the CPU (the recipe's ``device: auto``). A rerun
continues where it stopped and skips what is finished (``pipeline.py``). The numbers show the
stages run and hand over on toy data from a random start, not the paper's 53.1 mIoU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.files import atomic_open  # after the sys.path line above

RECIPE = os.path.join("recipes", "demo.yaml")
# --quick: the demo recipe at the sizes of the tests (a minute or two on a CPU)
QUICK = ["data.size=64,32", "data.num_source=6", "data.num_target_train=4", "data.num_target_val=2",
         "all.src_img_size=64,32", "all.tgt_img_size=64,32", "all.resize=64", "all.rcrop=64,32",
         "all.num-steps=2", "all.num-steps-stop=2", "all.save-pred-every=1"]
# The columns of the figure: the final checkpoint of each training stage, in pipeline order.
STAGES = {"source_only": "source-only", "phase1": "phase 1", "phase2": "phase 2"}
COLOURS = {"source_only": (206, 112, 20), "phase1": (52, 101, 164), "phase2": (46, 139, 87)}  # draw_pipeline.py's


# ------------------------------------------------------------------------------------------------ figure
def _tile(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    return cv2.resize(arr, size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)


def _hatched(d: object, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
    """A rectangle outlined in ``colour`` and filled with diagonal lines."""
    bx0, by0, bx1, by1 = box
    light = tuple(int(c + (255 - c) * 0.75) for c in colour)
    d.rectangle(box, fill=light, outline=colour, width=2)
    c = bx0 + by0 + 6
    while c < bx1 + by1:  # the lines x + y = c, clipped to the box
        xa, xb = max(bx0, c - by1), min(bx1, c - by0)
        if xa <= xb:
            d.line([(xa, c - xa), (xb, c - xb)], fill=colour, width=2)
        c += 10


@dataclass
class Bar:
    """One group of the figure's chart: a stage's target-val mIoU and its pseudo labels' accuracy."""

    label: str
    miou: float | None  # target-val mIoU, 0..1 (None: not a model)
    acc: float | None  # pseudo-label accuracy vs target-train ground truth, 0..1 (None: no pseudo labels)
    colour: tuple[int, int, int]


def draw_figure(path: str, bars: list[Bar], sample_rows: list[list[np.ndarray]], columns: list[str], note: str) -> None:
    """Per-stage mIoU and pseudo-label accuracy bars above rows of image | ground truth | each stage's prediction."""
    from PIL import Image, ImageDraw

    spec = importlib.util.spec_from_file_location("draw_pipeline", os.path.join(REPO, "scripts", "draw_pipeline.py"))
    dp = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(dp)

    tile_w, tile_h, gap = 256, 128, 10
    cols = ["image", "ground truth", *columns]
    width = 40 + len(cols) * tile_w + (len(cols) - 1) * gap + 40
    chart_h = 380
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
    # bar chart: per group a solid bar (target-val mIoU) and a hatched one (pseudo-label accuracy)
    x0, y0, x1, y1 = 120, 120, width - 60, 70 + chart_h - 60
    values = [100.0 * v for b in bars for v in (b.miou, b.acc) if v is not None]
    top = max(10.0, float(np.ceil(max(values, default=0.0) / 10.0) * 10.0))
    d.line([(x0, y1), (x1, y1)], fill=dp.INK, width=2)
    d.line([(x0, y0), (x0, y1)], fill=dp.INK, width=2)
    step = 5 if top <= 30 else 10 if top <= 60 else 20
    for v in range(0, int(top) + 1, step):
        y = y1 - (y1 - y0) * v / top
        d.line([(x0 - 6, y), (x0, y)], fill=dp.INK, width=2)
        d.line([(x0 + 1, y), (x1, y)], fill=(232, 232, 232), width=1)
        d.text((x0 - 10, y), f"{v}", font=dp.font(16), fill=dp.INK, anchor="rm")
    d.text((50, (y0 + y1) / 2), "%", font=dp.font(17, True), fill=dp.INK, anchor="mm")
    # legend
    lx = x0 + 10
    d.rectangle((lx, 78, lx + 26, 96), fill=dp.INK)
    d.text((lx + 34, 87), "target-val mIoU (evaluate.py)", font=dp.font(17), fill=dp.INK, anchor="lm")
    lx += 34 + probe.textlength("target-val mIoU (evaluate.py)", font=dp.font(17)) + 40
    _hatched(d, (lx, 78, lx + 26, 96), dp.INK)
    text = "pseudo-label accuracy vs target-train ground truth (monitoring only, never a loss)"
    d.text((lx + 34, 87), text, font=dp.font(17), fill=dp.INK, anchor="lm")
    slot = (x1 - x0) / len(bars)
    bw = slot * 0.28
    for i, b in enumerate(bars):
        cx = x0 + slot * (i + 0.5)
        for k, (v, hatched) in enumerate(((b.miou, False), (b.acc, True))):
            bx0 = cx - bw - 4 + k * (bw + 8)
            if v is None:
                d.text((bx0 + bw / 2, y1 - 14), "\u2013", font=dp.font(18), fill=dp.MUTED, anchor="mm")
                continue
            by = y1 - (y1 - y0) * 100.0 * v / top
            if hatched:
                _hatched(d, (bx0, by, bx0 + bw, y1 - 1), b.colour)
            else:
                d.rectangle((bx0, by, bx0 + bw, y1 - 1), fill=b.colour)
            d.text((bx0 + bw / 2, by - 13), f"{100 * v:.1f}", font=dp.font(17, True), fill=dp.INK, anchor="mm")
        for j, part in enumerate(b.label.split("\n")):
            d.text((cx, y1 + 18 + 20 * j), part, font=dp.font(16 if j else 17, j == 0),
                   fill=dp.INK if j == 0 else dp.MUTED, anchor="mm")
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
    with atomic_open(path) as f:
        img.save(f, format="PNG", optimize=True)


def sample_rows(out: str, seed: str, count: int) -> list[list[np.ndarray]]:
    """image | ground truth | each stage's final prediction (evaluate.py --save_dir), for the first
    ``count`` val images of the generated data."""
    import cv2

    from datasets.cityscapes import CityscapesDataset
    from datasets.gta5 import read_image, read_label_ids
    from datasets.labels import colorize, encode_labels

    ds = CityscapesDataset(os.path.join(out, "data", "cityscapes"), split="val", img_size=(64, 64))
    rows = []
    for path in ds.files[:count]:
        name = os.path.basename(path)
        img = read_image(path)
        gt = colorize(encode_labels(read_label_ids(ds.label_path(path))))
        row = [_tile(img, (256, 128), False), _tile(gt, (256, 128), True)]
        for stage in STAGES:
            pred = cv2.imread(os.path.join(out, f"seed_{seed}", "evaluate", f"{stage}_final", "preds", "trainid", name),
                              cv2.IMREAD_GRAYSCALE)
            row.append(_tile(colorize(pred), (256, 128), True))
        rows.append(row)
    return rows


def figure_from_report(out: str, path: str, samples: int = 3) -> None:
    """``path``: the demo's figure, every number from ``<out>/report.json``."""
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    bars = []
    for stage, label in STAGES.items():
        e = report["stages"].get(f"{stage}/final")
        p = report["pseudo_labels"].get(stage)
        steps = _iterations(out, report["seeds"][0], stage)
        sub = {"source_only": "source labels only", "phase1": "aux labels", "phase2": "fused labels"}[stage]
        bars.append(Bar(f"{label} ({steps} it)\n{sub}", None if e is None else e["miou_mean"] / 100.0,
                        None if p is None else p["acc_mean"] / 100.0, COLOURS[stage]))
    n = len(report["seeds"])
    note = (f"Target-val mIoU of each stage's final checkpoint and the accuracy of the pseudo labels it trains on, "
            f"{'mean over ' + str(n) + ' seeds' if n > 1 else 'seed ' + report['seeds'][0]} (report.json). Toy data "
            "from a RANDOMLY initialised backbone and short schedules: the numbers show the stages run and hand "
            "over, not the paper's result.")
    draw_figure(path, bars, sample_rows(out, report["seeds"][0], samples), list(STAGES.values()), note)


def _iterations(out: str, seed: str, stage: str) -> int | None:
    args = os.path.join(out, f"seed_{seed}", stage, f"{stage}_args.json")
    if not os.path.isfile(args):
        return None
    with open(args, encoding="utf-8") as f:
        a = json.load(f)
    return min(a["num_steps"], a["num_steps_stop"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "demo_out"), help="run folder (default ./demo_out)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, two iterations per stage: for tests")
    parser.add_argument("--figure", default=None,
                        help="figure path (default: figs/demo.png for a full run into ./demo_out, else <out>/demo.png)")
    args, rest = parser.parse_known_args(argv)
    out = os.path.abspath(args.out)
    default_out = out == os.path.abspath(os.path.join(REPO, "demo_out"))
    command = [sys.executable, os.path.join(REPO, "pipeline.py"), RECIPE, "--out", out, "--quiet", "--drop_states",
               *[a for s in (QUICK if args.quick else []) for a in ("--set", s)], *rest]
    print("demo: python3 " + " ".join(command[1:]), flush=True)
    code = subprocess.run(command, cwd=REPO, check=False).returncode
    if code != 0:
        return code
    own = os.path.join(out, "demo.png")
    figure_from_report(out, own, samples=1 if args.quick else 3)
    figure = args.figure or (os.path.join(REPO, "figs", "demo.png") if default_out and not args.quick else own)
    if os.path.abspath(figure) != own:
        os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
        shutil.copyfile(own, figure)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        print("\n" + f.read())
    print(f"figure: {figure}\nreport: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
