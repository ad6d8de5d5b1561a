"""Draw figs/pipeline.png: the stages of the pipeline and the networks of phase 1 and phase 2.

    python3 scripts/draw_pipeline.py [--out figs/pipeline.png]

Only Pillow is used (no matplotlib). The small drawing helpers here (fonts, boxes, arrows,
text) are shared with scripts/demo.py.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Colours (RGB)
INK = (33, 37, 41)
MUTED = (96, 104, 112)
WHITE = (255, 255, 255)
STAGE = (222, 235, 250)
STAGE_EDGE = (52, 101, 164)
SOURCE = (255, 226, 196)
SOURCE_EDGE = (206, 112, 20)
TARGET = (205, 236, 214)
TARGET_EDGE = (46, 139, 87)
SHARED = (228, 228, 236)
SHARED_EDGE = (90, 90, 110)
HEAD = (237, 224, 250)
HEAD_EDGE = (120, 80, 170)
DISC = (250, 212, 212)
DISC_EDGE = (190, 40, 40)
DATA = (250, 250, 236)
DATA_EDGE = (150, 150, 110)
LOSS = (190, 40, 40)

_FONT_CACHE: dict[tuple[int, bool], ImageFont.ImageFont] = {}


def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    """A scalable font: DejaVu Sans when installed, else Pillow's bundled font, else the bitmap one."""
    key = (size, bold)
    if key not in _FONT_CACHE:
        names = ["DejaVuSans-Bold.ttf", "DejaVuSans.ttf"] if bold else ["DejaVuSans.ttf"]
        found = None
        for name in names:
            try:
                found = ImageFont.truetype(name, size)
                break
            except OSError:
                continue
        if found is None:
            try:
                found = ImageFont.load_default(size=size)  # Pillow >= 10.1
            except TypeError:
                found = ImageFont.load_default()
        _FONT_CACHE[key] = found
    return _FONT_CACHE[key]


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt: ImageFont.ImageFont) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.multiline_textbbox((0, 0), text, font=fnt, spacing=4, align="center")
    return x1 - x0, y1 - y0


def centred_text(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, fnt: ImageFont.ImageFont,
                 fill=INK) -> None:
    draw.multiline_text(centre, text, font=fnt, fill=fill, anchor="mm", align="center", spacing=4)


def box(draw: ImageDraw.ImageDraw, xyxy: Sequence[float], title: str, body: str = "", fill=STAGE, edge=STAGE_EDGE,
        title_size: int = 22, body_size: int = 16, radius: int = 12, width: int = 3) -> tuple[float, ...]:
    """A rounded box with a bold title line and an optional smaller body; returns ``xyxy``."""
    x0, y0, x1, y1 = xyxy
    draw.rounded_rectangle(xyxy, radius=radius, fill=fill, outline=edge, width=width)
    tf, bf = font(title_size, bold=True), font(body_size)
    th = text_size(draw, title, tf)[1]
    bh = text_size(draw, body, bf)[1] if body else 0
    gap = 8 if body else 0
    top = (y0 + y1) / 2 - (th + gap + bh) / 2
    centred_text(draw, ((x0 + x1) / 2, top + th / 2), title, tf)
    if body:
        centred_text(draw, ((x0 + x1) / 2, top + th + gap + bh / 2), body, bf, fill=MUTED)
    return tuple(xyxy)


def arrow(draw: ImageDraw.ImageDraw, points: Sequence[tuple[float, float]], fill=INK, width: int = 3,
          head: int = 12, dashed: bool = False) -> None:
    """A polyline through ``points`` with an arrowhead at the last point."""
    import math

    pts = [tuple(map(float, p)) for p in points]
    for a, b in itertools.pairwise(pts):
        if dashed:
            length = math.dist(a, b)
            n = max(1, int(length // 12))
            for i in range(0, n, 2):
                t0, t1 = i / n, min(1.0, (i + 1) / n)
                draw.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                           (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=fill, width=width)
        else:
            draw.line([a, b], fill=fill, width=width)
    (ax, ay), (bx, by) = pts[-2], pts[-1]
    ang = math.atan2(by - ay, bx - ax)
    left = (bx - head * math.cos(ang - 0.45), by - head * math.sin(ang - 0.45))
    right = (bx - head * math.cos(ang + 0.45), by - head * math.sin(ang + 0.45))
    draw.polygon([(bx, by), left, right], fill=fill)


def label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 16, fill=MUTED,
          anchor: str = "mm", bold: bool = False) -> None:
    draw.multiline_text(xy, text, font=font(size, bold), fill=fill, anchor=anchor, align="center", spacing=3)


def panel(draw: ImageDraw.ImageDraw, xyxy: Sequence[float], title: str) -> None:
    """A light frame with a title on its top edge."""
    x0, y0 = xyxy[0], xyxy[1]
    draw.rounded_rectangle(xyxy, radius=16, fill=(250, 251, 253), outline=(180, 186, 194), width=2)
    f = font(22, bold=True)
    w, h = text_size(draw, title, f)
    draw.rectangle((x0 + 18, y0 - h / 2 - 4, x0 + 30 + w, y0 + h / 2 + 6), fill=WHITE)
    draw.text((x0 + 24, y0), title, font=f, fill=INK, anchor="lm")


# ------------------------------------------------------------------------------------------ the figure
def draw_pipeline(path: str) -> str:
    W, H = 2000, 1180
    img = Image.new("RGB", (W, H), WHITE)
    d = ImageDraw.Draw(img)
    d.text((W / 2, 34), "DecoupleNet (re-implementation): GTA5 \u2192 Cityscapes, stage by stage", font=font(30, True),
           fill=INK, anchor="mm")
    label(d, (W / 2, 70), "every stage is one command; each writes the file the next one reads", size=18)

    # ---- row 1: the stages
    stages = [
        ("1  source-only", "train_source_only.py\nImageNet ResNet-101\n\u2192 GTA5 labels", "sourceonly.pth"),
        ("2  phase 1", "train_phase1.py\ndecoupled stems,\nD1 + D2, aux classifier", "GTA5_60000.pth\n(phase-1 layout)"),
        ("3  soft labels", "generate_soft_label.py\ntarget-branch logits of\nevery Cityscapes train image",
         "<image>.npy\n19 x H/8 x W/8"),
        ("4  thresholds", "datasets/get_thresholds.py\n0.8 FOLDER\nper-class confidence", "..._thresholds_p0.8.npy\n19 values"),
        ("5  phase 2", "train_phase2.py\nonline enhanced\nself-training", "GTA5_40000.pth\n(phase-2 layout)"),
        ("6  evaluate", "evaluate.py\nCityscapes val mIoU\n(--flip, --scales)", "results.json\n19 IoUs + mIoU"),
    ]
    n = len(stages)
    margin, gap = 40, 42
    bw = (W - 2 * margin - (n - 1) * gap) / n
    y0, y1 = 140, 290
    boxes = []
    for i, (title, body, out) in enumerate(stages):
        x0 = margin + i * (bw + gap)
        boxes.append(box(d, (x0, y0, x0 + bw, y1), title, body, title_size=23, body_size=16))
        label(d, (x0 + bw / 2, y1 + 30), out, size=15, fill=STAGE_EDGE)
    for a, b in itertools.pairwise(boxes):
        arrow(d, [(a[2] + 4, (y0 + y1) / 2), (b[0] - 4, (y0 + y1) / 2)], fill=STAGE_EDGE, width=4, head=14)
    # phase 1 checkpoint also starts phase 2 (the original's --resume [PATH_OF_PHASE1_MODEL])
    ax = (boxes[1][0] + boxes[1][2]) / 2
    bx = (boxes[4][0] + boxes[4][2]) / 2
    ytop = y0 - 14
    arrow(d, [(ax + 40, y0), (ax + 40, ytop), (bx - 40, ytop), (bx - 40, y0)], fill=MUTED, width=2, head=10,
          dashed=True)
    label(d, ((ax + bx) / 2, ytop - 13), "the phase-1 weights also start phase 2 (--resume)", size=15)

    # ---- phase 1 detail
    px0, py0, px1, py1 = 40, 395, 1480, 1150
    panel(d, (px0, py0, px1, py1), "phase 1: one iteration (train_phase1.py)")
    col = {"in": 70, "stem": 330, "body": 590, "head": 810, "cls": 1040}
    ys, yt = 490, 820  # source row, target row
    bh = 90
    xs_box = box(d, (col["in"], ys - 45, col["in"] + 200, ys + 45), "source image", "GTA5 crop x_s\n+ label y_s",
                 fill=DATA, edge=DATA_EDGE, title_size=18, body_size=15)
    xt_box = box(d, (col["in"], yt - 45, col["in"] + 200, yt + 45), "target image", "Cityscapes crop x_t\n(no label)",
                 fill=DATA, edge=DATA_EDGE, title_size=18, body_size=15)
    b1 = box(d, (col["stem"], ys - bh / 2, col["stem"] + 190, ys + bh / 2), "B1", "source stem\nconv1..layer1",
             fill=SOURCE, edge=SOURCE_EDGE)
    b2 = box(d, (col["stem"], yt - bh / 2, col["stem"] + 190, yt + bh / 2), "B2", "target stem\nconv1..layer1",
             fill=TARGET, edge=TARGET_EDGE)
    ym = (ys + yt) / 2
    body = box(d, (col["body"], ym - 70, col["body"] + 170, ym + 70), "B", "shared body\nlayer2..layer4\n(dilated, OS 8)",
               fill=SHARED, edge=SHARED_EDGE)
    head = box(d, (col["head"], ym - 70, col["head"] + 180, ym + 70), "head", "ASPP: 4 dilated\n3x3 convs, summed\n"
               "2048 \u2192 128", fill=HEAD, edge=HEAD_EDGE)
    cls = box(d, (col["cls"], ys - 40, col["cls"] + 210, ys + 40), "classifier", "1x1 conv 128 \u2192 19",
              fill=HEAD, edge=HEAD_EDGE, title_size=20)
    aux = box(d, (col["cls"], yt - 40, col["cls"] + 210, yt + 40), "aux classifier", "1x1 conv (target only)",
              fill=HEAD, edge=HEAD_EDGE, title_size=20)
    d1 = box(d, (col["stem"] + 25, ym - 42, col["stem"] + 165, ym + 42), "D1", "on stem\nfeatures",
             fill=DISC, edge=DISC_EDGE, title_size=20, body_size=14)
    d2 = box(d, (col["cls"] + 20, ym - 45, col["cls"] + 190, ym + 45), "D2", "on softmax\noutputs",
             fill=DISC, edge=DISC_EDGE, title_size=20, body_size=14)
    # data flow
    arrow(d, [(xs_box[2], ys), (b1[0], ys)], fill=SOURCE_EDGE)
    arrow(d, [(xt_box[2], yt), (b2[0], yt)], fill=TARGET_EDGE)
    arrow(d, [(b1[2], ys), (body[0] - 30, ys), (body[0] - 30, ym - 30), (body[0], ym - 30)], fill=SOURCE_EDGE)
    arrow(d, [(b2[2], yt), (body[0] - 30, yt), (body[0] - 30, ym + 30), (body[0], ym + 30)], fill=TARGET_EDGE)
    label(d, ((b1[2] + body[0] - 30) / 2, ys - 16), "f_s", size=17, fill=SOURCE_EDGE, bold=True)
    label(d, ((b2[2] + body[0] - 30) / 2, yt + 18), "f_t", size=17, fill=TARGET_EDGE, bold=True)
    arrow(d, [(body[2], ym), (head[0], ym)], fill=SHARED_EDGE)
    arrow(d, [(head[2], ym - 40), (head[2] + 40, ym - 40), (head[2] + 40, ys), (cls[0], ys)], fill=HEAD_EDGE)
    arrow(d, [(head[2], ym + 40), (head[2] + 40, ym + 40), (head[2] + 40, yt), (aux[0], yt)], fill=TARGET_EDGE)
    label(d, (head[2] + 48, ym + 66), "target\nonly", size=14, fill=TARGET_EDGE, anchor="lm")
    # D1 reads both stems' features
    arrow(d, [((b1[0] + b1[2]) / 2, b1[3]), ((b1[0] + b1[2]) / 2, d1[1])], fill=DISC_EDGE, width=2, dashed=True)
    arrow(d, [((b2[0] + b2[2]) / 2, b2[1]), ((b2[0] + b2[2]) / 2, d1[3])], fill=DISC_EDGE, width=2, dashed=True)
    # D2 reads the classifier outputs of both domains
    arrow(d, [((cls[0] + cls[2]) / 2, cls[3]), ((cls[0] + cls[2]) / 2, d2[1])], fill=DISC_EDGE, width=2, dashed=True)
    # losses
    lx = cls[2] + 22
    label(d, (lx, ys - 22), "source: CE(p_s / T, y_s)", size=16, fill=LOSS, anchor="lm")
    label(d, (lx, ys + 4), "target: p_t / T", size=16, fill=LOSS, anchor="lm")
    label(d, (lx, ys + 26), "T = 1.8", size=15, fill=MUTED, anchor="lm")
    label(d, (lx, ym - 12), "LS-GAN: p_t \u2192 'source'", size=16, fill=LOSS, anchor="lm")
    label(d, (lx, ym + 12), "0.01 x L_adv_tgt", size=15, fill=MUTED, anchor="lm")
    label(d, (lx, yt - 12), "0.1 x CE(aux, pseudo", size=16, fill=LOSS, anchor="lm")
    label(d, (lx, yt + 10), "labels from the online", size=16, fill=LOSS, anchor="lm")
    label(d, (lx, yt + 32), "class thresholds)", size=16, fill=LOSS, anchor="lm")
    label(d, ((xs_box[0] + xs_box[2]) / 2, ym), "D1: 0.1 x L_adv_src\n(f_s \u2192 'target')", size=15, fill=LOSS)
    # legend / notes
    notes = [
        "Source images go through B1, target images through B2; both then share B, head and classifier.",
        "Self-Discrimination: the aux classifier learns the target's confident predictions (per-class",
        "confidence banks, threshold = 80th percentile) so target features become separable.",
        "D1 and D2 are trained with the opposite labels; SGD (stems + body at lr, head at 10 lr), Adam for D.",
    ]
    for i, t in enumerate(notes):
        label(d, (px0 + 30, 955 + 26 * i), t, size=17, fill=INK, anchor="lm")
    legend = [(SOURCE, SOURCE_EDGE, "source-only path"), (TARGET, TARGET_EDGE, "target-only path"),
              (SHARED, SHARED_EDGE, "shared"), (HEAD, HEAD_EDGE, "head / classifiers"),
              (DISC, DISC_EDGE, "discriminators (training only)")]
    lx0 = px0 + 30
    for fill, edge, text in legend:
        d.rounded_rectangle((lx0, 1085, lx0 + 26, 1109), radius=5, fill=fill, outline=edge, width=2)
        d.text((lx0 + 34, 1097), text, font=font(16), fill=INK, anchor="lm")
        lx0 += 60 + d.textlength(text, font=font(16))

    # ---- phase 2 detail
    qx0, qy0, qx1, qy1 = 1520, 395, 1960, 1150
    panel(d, (qx0, qy0, qx1, qy1), "phase 2 (train_phase2.py)")
    cx = (qx0 + qx1) / 2
    net = box(d, (qx0 + 30, 450, qx1 - 30, 560), "B2 \u2192 B \u2192 head \u2192 classifier",
              "the target branch of phase 1\n(B1, aux classifier, D1, D2\nare dropped)", fill=TARGET, edge=TARGET_EDGE,
              title_size=19, body_size=15)
    soft = box(d, (qx0 + 30, 620, cx - 10, 710), "soft labels", "phase-1 logits\n(step 3)", fill=DATA,
               edge=DATA_EDGE, title_size=18, body_size=14)
    thr = box(d, (cx + 10, 620, qx1 - 30, 710), "thresholds", "per class\n(step 4)", fill=DATA, edge=DATA_EDGE,
              title_size=18, body_size=14)
    fuse = box(d, (qx0 + 30, 770, qx1 - 30, 880), "pseudo labels, online",
               "soft label fused with the network's own\nprediction on the whole image,\ncarried into the augmented crop",
               fill=HEAD, edge=HEAD_EDGE, title_size=18, body_size=14)
    arrow(d, [((soft[0] + soft[2]) / 2, soft[3]), ((soft[0] + soft[2]) / 2, fuse[1])], fill=HEAD_EDGE)
    arrow(d, [((thr[0] + thr[2]) / 2, thr[3]), ((thr[0] + thr[2]) / 2, fuse[1])], fill=HEAD_EDGE)
    arrow(d, [(qx1 - 30, (net[1] + net[3]) / 2), (qx1 - 14, (net[1] + net[3]) / 2), (qx1 - 14, (fuse[1] + fuse[3]) / 2),
              (qx1 - 30, (fuse[1] + fuse[3]) / 2)], fill=TARGET_EDGE, width=2)
    p2notes = ["loss = CE(source) + CE(target crop,", "pseudo labels); colour jitter on", "both crops; lr 5e-4",
               "", "then: evaluate.py on the final", "checkpoint (Cityscapes val, 19", "classes; the paper: 53.1 mIoU)"]
    for i, t in enumerate(p2notes):
        label(d, (qx0 + 30, 920 + 26 * i), t, size=17, fill=INK, anchor="lm")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "figs", "pipeline.png"))
    args = parser.parse_args()
    print(f"wrote {draw_pipeline(args.out)}")


if __name__ == "__main__":
    main()
