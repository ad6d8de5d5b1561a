"""Small synthetic GTA5 / Cityscapes / SYNTHIA trees for tests and demos.

``python3 -m datasets.synthetic --out DIR`` writes ``DIR/gta5`` (source layout of docs/METHOD.md
section 1: images/, labels/ with Cityscapes label ids, split.mat, gtav_label_info.p),
``DIR/cityscapes`` (leftImg8bit/ and gtFine/ for train and val) and, with ``--synthia``,
``DIR/synthia`` (RGB/, GT/LABELS/ 16-bit with the class id in the red channel).

Scenes are street-like (sky at the top, buildings and vegetation in the middle, road and
sidewalk at the bottom, random objects) so that all 19 classes appear across the set.
Source and target differ in palette, lighting, noise and blur, so there is a real
domain gap to adapt over. Everything is a deterministic function of the seed.

``--gap_kind`` chooses what the two domains differ in; ``--gap`` scales the difference (0: the
target is painted like the source, 1: the full gap):

- ``colour`` (the default; its output is the generator's original one): the target's palette is
  shifted, its global brightness, contrast and gamma change, and it has more noise and blur. With
  a randomly initialised backbone such a gap sits almost entirely in the first BatchNorm
  layers' statistics (a per-channel shift and scale of the image), which is not what the
  method's decoupled stems are for.
- ``filter``: a gap that the convolution filters must adapt to. Both domains keep the source's
  palette and global tone, and every class wears the same oriented stripes (its texture) in
  both. In the target the sensor noise is higher (std 14 vs 4 grey levels), the image is
  blurred (sigma 0.8 px vs sharp), and the lighting varies inside the image: a smooth gain
  field and a brightness ramp across the image (each about +-30 %) and one or two hard-edged
  cast shadows (about 40 % darker). ``--gap`` interpolates every one of these, so
  ``--gap_kind filter --gap 0.5`` is half of each difference.
- ``texture``: as ``filter``, and in the target every class's stripes are also turned by 45-90
  degrees and have another period (2-3 pixels finer or coarser): the same class looks different
  (``--gap`` blends the two sets of stripes).

``--tint T`` (default 0: off, for every kind) gives every image of *both* domains its own colour,
as white balance, exposure and weather do: a hue shift of up to +-T of the colour circle and
saturation and value scaled by 1 +- 2.5 T, drawn per image. It is not a domain gap (both domains
draw from the same range); it makes colour a less reliable cue than texture and shape, as on real
data. The demo (``scripts/demo.py``) uses ``--gap_kind filter --tint 0.1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .label_info import label_info_from_folder, save_label_info
from .labels import CITYSCAPES_IDS, CLASS_NAMES_16, CLASS_NAMES_19, PALETTE, SYNTHIA_IDS

VOID = 255  # "no training class" in the rendered train-id map

# Train ids by name (CLASS_NAMES_19 order).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)

# Natural-looking base colours (RGB) per train id; the domains shift them.
_BASE_COLOURS = np.array(
    [
        (95, 92, 98), (160, 150, 145), (125, 105, 95), (150, 140, 120), (115, 100, 80),
        (70, 70, 75), (45, 45, 40), (215, 190, 50), (65, 115, 45), (125, 145, 75),
        (145, 185, 230), (160, 60, 65), (180, 90, 50), (45, 65, 150), (95, 95, 125),
        (190, 160, 45), (105, 125, 115), (80, 45, 100), (55, 95, 65),
    ],
    dtype=np.float32,
)

# Objects that stand on the ground; each image gets one of these in turn (so every
# class appears across the set) plus a few random extra ones.
_OBJECT_CYCLE = (PERSON, CAR, RIDER, TRUCK, BUS, BICYCLE, TRAIN, MOTORCYCLE)

# Cityscapes label ids used for void areas: 0 unlabeled, 1 ego vehicle, 4 static,
# 5 dynamic, 6 ground.
_VOID_IDS = (0, 4, 5, 6)


@dataclass(frozen=True)
class DomainStyle:
    """Appearance of one synthetic domain."""

    offset: tuple[float, float, float]  # added to every class colour (RGB)
    gain: float  # global brightness gain
    contrast: float  # contrast around mid-grey
    noise: float  # std of per-pixel noise
    blur: float  # Gaussian blur sigma (0 = sharp)
    gamma: float
    texture: float  # amplitude of low-frequency texture
    # Filter-level appearance (all off by default, so the "colour" styles below paint as before):
    pattern: float = 0.0  # amplitude of the per-class stripe texture (grey levels)
    pattern_mix: float = 0.0  # 0: every class wears its bank-0 stripes, 1: its bank-1 stripes
    shading: float = 0.0  # in-image lighting: smooth gain field, a brightness ramp, cast shadows
    tint: float = 0.0  # per-image colour: hue shift up to +-tint of the circle, saturation, value x(1 +- 2.5 tint)


_SOURCE_STYLE = DomainStyle((18.0, 6.0, -14.0), 1.08, 1.25, 4.0, 0.0, 0.9, 22.0)
_TARGET_STYLE = DomainStyle((-12.0, 4.0, 16.0), 0.85, 0.8, 10.0, 1.2, 1.15, 10.0)
_SYNTHIA_STYLE = DomainStyle((8.0, -10.0, 4.0), 1.0, 1.1, 6.0, 0.6, 1.0, 16.0)

# --gap_kind filter: both domains keep the source's palette and global tone (offset, gain,
# contrast, gamma, low-frequency texture) and every class wears the same oriented stripes (its
# texture); the gap is in what the convolution filters see: more sensor noise, blur, and lighting
# that varies inside the image (a smooth gain field, a ramp and hard-edged cast shadows).
# --gap_kind texture: the same, and each class's stripes also change (bank 1: turned, another period).
_SOURCE_FILTER_STYLE = DomainStyle((18.0, 6.0, -14.0), 1.08, 1.25, 4.0, 0.0, 0.9, 22.0,
                                   pattern=24.0, pattern_mix=0.0, shading=0.0)
_TARGET_FILTER_STYLE = DomainStyle((18.0, 6.0, -14.0), 1.08, 1.25, 14.0, 0.8, 0.9, 22.0,
                                   pattern=24.0, pattern_mix=0.0, shading=0.6)
_TARGET_TEXTURE_STYLE = dataclasses.replace(_TARGET_FILTER_STYLE, pattern_mix=1.0)

GAP_KINDS = ("colour", "filter", "texture")


def source_style(kind: str = "colour") -> DomainStyle:
    """The source domain's style for a ``--gap_kind``."""
    if kind not in GAP_KINDS:
        raise ValueError(f"gap kind must be one of {GAP_KINDS}, got {kind!r}")
    return _SOURCE_STYLE if kind == "colour" else _SOURCE_FILTER_STYLE


def target_style(gap: float = 1.0, kind: str = "colour") -> DomainStyle:
    """The target domain's style ``gap`` of the way from the source style's (1.0: the usual target).

    Every field is interpolated linearly; ``gap=0`` paints both domains alike (only the scenes
    differ), ``gap=0.5`` halves the differences. ``kind="colour"`` (the default): palette,
    global lighting, noise and blur differ; ``kind="filter"``: the palette, global tone and
    per-class stripes are the source's, and noise, blur and in-image lighting differ;
    ``kind="texture"``: as ``"filter"``, and each class's stripes change too.
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    s = source_style(kind)
    t = {"colour": _TARGET_STYLE, "filter": _TARGET_FILTER_STYLE, "texture": _TARGET_TEXTURE_STYLE}[kind]
    if gap == 1.0:
        return t

    def mix(a: float, b: float) -> float:
        return a + gap * (b - a)

    return DomainStyle(tuple(mix(a, b) for a, b in zip(s.offset, t.offset)), mix(s.gain, t.gain),
                       mix(s.contrast, t.contrast), mix(s.noise, t.noise), max(0.0, mix(s.blur, t.blur)),
                       mix(s.gamma, t.gamma), max(0.0, mix(s.texture, t.texture)),
                       max(0.0, mix(s.pattern, t.pattern)), min(1.0, max(0.0, mix(s.pattern_mix, t.pattern_mix))),
                       max(0.0, mix(s.shading, t.shading)))


def _fill_rect(lbl: np.ndarray, y0: float, y1: float, x0: float, x1: float, c: int) -> None:
    """Paint a clipped rectangle of class ``c`` into the label map."""
    h, w = lbl.shape
    ya, yb = max(0, int(y0)), min(h, int(np.ceil(y1)))
    xa, xb = max(0, int(x0)), min(w, int(np.ceil(x1)))
    if ya < yb and xa < xb:
        lbl[ya:yb, xa:xb] = c


def _fill_ellipse(lbl: np.ndarray, cy: float, cx: float, ry: float, rx: float, c: int) -> None:
    """Paint an ellipse of class ``c``."""
    cv2.ellipse(lbl, (int(cx), int(cy)), (max(1, int(rx)), max(1, int(ry))), 0, 0, 360,
                int(c), -1)


def _draw_object(lbl: np.ndarray, rng: np.random.Generator, cls: int, horizon: int) -> None:
    """Draw one ground object of class ``cls`` at a random place below the horizon."""
    h, w = lbl.shape
    foot = rng.uniform(horizon + 0.15 * (h - horizon), h * 0.97)  # bottom y
    scale = (foot - horizon) / max(1.0, h - horizon)  # perspective: bigger when closer
    cx = rng.uniform(0.08, 0.92) * w
    unit = h * (0.12 + 0.55 * scale)
    if cls == PERSON:
        bw, bh = 0.22 * unit, 0.8 * unit
        _fill_rect(lbl, foot - bh, foot, cx - bw / 2, cx + bw / 2, PERSON)
        _fill_ellipse(lbl, foot - bh, cx, 0.13 * unit, 0.11 * unit, PERSON)
    elif cls in (RIDER, BICYCLE, MOTORCYCLE):
        vehicle = MOTORCYCLE if cls == MOTORCYCLE else BICYCLE
        vw, vh = 0.6 * unit, 0.32 * unit
        _fill_ellipse(lbl, foot - vh / 3, cx - vw / 3, vh / 3, vh / 3, vehicle)
        _fill_ellipse(lbl, foot - vh / 3, cx + vw / 3, vh / 3, vh / 3, vehicle)
        _fill_rect(lbl, foot - vh, foot - vh / 2, cx - vw / 3, cx + vw / 3, vehicle)
        if cls == RIDER or rng.random() < 0.5:
            _fill_rect(lbl, foot - vh - 0.45 * unit, foot - vh * 0.8, cx - 0.1 * unit,
                       cx + 0.1 * unit, RIDER)
            _fill_ellipse(lbl, foot - vh - 0.5 * unit, cx, 0.09 * unit, 0.08 * unit, RIDER)
    elif cls == CAR:
        bw, bh = 1.0 * unit, 0.42 * unit
        _fill_rect(lbl, foot - bh * 0.6, foot, cx - bw / 2, cx + bw / 2, CAR)
        _fill_rect(lbl, foot - bh, foot - bh * 0.55, cx - bw / 3, cx + bw / 3, CAR)
    elif cls == TRUCK:
        bw, bh = 1.3 * unit, 0.8 * unit
        _fill_rect(lbl, foot - bh, foot, cx - bw / 2, cx + bw / 5, TRUCK)
        _fill_rect(lbl, foot - bh * 0.6, foot, cx + bw / 5, cx + bw / 2, TRUCK)
    elif cls == BUS:
        bw, bh = 1.8 * unit, 0.85 * unit
        _fill_rect(lbl, foot - bh, foot, cx - bw / 2, cx + bw / 2, BUS)
    elif cls == TRAIN:
        bh = 0.75 * unit
        _fill_rect(lbl, foot - bh, foot, cx - 1.5 * unit, cx + 1.5 * unit, TRAIN)


def render_scene(
    rng: np.random.Generator, width: int, height: int, must_have: Sequence[int] = ()
) -> np.ndarray:
    """Random street-like layout as a train-id map (uint8, VOID = 255 for no class)."""
    w, h = width, height
    lbl = np.full((h, w), SKY, dtype=np.uint8)
    horizon = int(h * rng.uniform(0.42, 0.55))
    # Buildings, walls and trees along the horizon.
    x = 0.0
    while x < w:
        seg = rng.uniform(0.08, 0.25) * w
        top = horizon - rng.uniform(0.12, 0.38) * h
        kind = rng.choice([BUILDING, BUILDING, BUILDING, VEGETATION, WALL])
        if kind == VEGETATION:
            _fill_ellipse(lbl, top + 0.1 * h, x + seg / 2, 0.14 * h, seg / 2, VEGETATION)
            _fill_rect(lbl, top + 0.1 * h, horizon, x, x + seg, VEGETATION)
        elif kind == WALL:
            _fill_rect(lbl, horizon - 0.1 * h, horizon, x, x + seg, WALL)
        else:
            _fill_rect(lbl, top, horizon, x, x + seg, BUILDING)
        x += seg
    # Always some wall and vegetation.
    wx = rng.uniform(0, 0.7) * w
    _fill_rect(lbl, horizon - 0.07 * h, horizon, wx, wx + 0.2 * w, WALL)
    vx = rng.uniform(0, 0.8) * w
    _fill_ellipse(lbl, horizon - 0.12 * h, vx, 0.1 * h, 0.08 * w, VEGETATION)
    # Ground: terrain at the edges, sidewalks, road in the middle.
    lbl[horizon:] = TERRAIN
    ys = np.arange(horizon, h, dtype=np.float32)
    t = (ys - horizon) / max(1, h - horizon)
    centre = w * rng.uniform(0.4, 0.6)
    road_half = w * (0.04 + 0.6 * t)
    walk = w * (0.02 + 0.22 * t)
    xs = np.arange(w, dtype=np.float32)[None, :]
    dist = np.abs(xs - centre)
    ground = np.where(dist < road_half[:, None], ROAD,
                      np.where(dist < (road_half + walk)[:, None], SIDEWALK, TERRAIN))
    lbl[horizon:] = ground.astype(np.uint8)
    # Fence segment between sidewalk and terrain, poles with lights and signs.
    fy = horizon + 0.05 * (h - horizon)
    fx = rng.uniform(0, 0.6) * w
    _fill_rect(lbl, fy - 0.08 * h, fy + 0.02 * h, fx, fx + rng.uniform(0.15, 0.35) * w, FENCE)
    for k in range(int(rng.integers(2, 5))):
        px = rng.uniform(0.03, 0.97) * w
        foot = horizon + rng.uniform(0.1, 0.6) * (h - horizon)
        ph = (0.25 + 0.45 * (foot - horizon) / (h - horizon)) * h
        pw = max(2.0, 0.008 * w * (1 + 2 * (foot - horizon) / (h - horizon)))
        _fill_rect(lbl, foot - ph, foot, px - pw / 2, px + pw / 2, POLE)
        top_cls = LIGHT if k % 2 == 0 else SIGN
        bs = max(3.0, 3 * pw)
        _fill_rect(lbl, foot - ph - bs * (1.8 if top_cls == LIGHT else 1.0), foot - ph + 1,
                   px - bs / 2, px + bs / 2, top_cls)
    # Ground objects, far ones first so that near ones occlude them.
    objects = list(must_have) + [int(c) for c in rng.choice(
        _OBJECT_CYCLE, size=int(rng.integers(1, 4)))]
    rng.shuffle(objects)
    for cls in objects:
        _draw_object(lbl, rng, int(cls), horizon)
    # A few void patches (unlabeled / static / dynamic / ground in Cityscapes ids).
    for _ in range(int(rng.integers(0, 3))):
        vy, vx = rng.uniform(horizon, h), rng.uniform(0, w)
        _fill_rect(lbl, vy, vy + 0.04 * h, vx, vx + 0.05 * w, VOID)
    return lbl


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in about [-1, 1]."""
    grid = rng.standard_normal((cells, max(2, cells * w // max(1, h)))).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _stripe_banks() -> np.ndarray:
    """Per-class stripe (angle, period in pixels) for banks 0 and 1, shape (2, 19, 2); fixed."""
    g = np.random.default_rng(1234)
    angles = g.permutation(np.linspace(0.0, np.pi, 19, endpoint=False))
    periods = g.uniform(3.0, 7.0, size=19)
    # Bank 1 turns every class's stripes by a quarter to a half turn and changes their period.
    turn = g.uniform(np.pi / 4, np.pi / 2, size=19) * g.choice([-1.0, 1.0], size=19)
    periods1 = np.where(periods < 5.0, periods + g.uniform(2.0, 3.0, size=19), periods - g.uniform(2.0, 3.0, size=19))
    return np.stack([np.stack([angles, periods], 1), np.stack([angles + turn, periods1], 1)]).astype(np.float32)


_STRIPES = _stripe_banks()


def _stripes(rng: np.random.Generator, lbl: np.ndarray, mix: float) -> np.ndarray:
    """Per-pixel stripe value in [-1, 1]: each class's stripes, ``mix`` of the way from bank 0 to bank 1."""
    h, w = lbl.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0.0, 2 * np.pi, size=19).astype(np.float32)
    out = np.zeros((h, w), dtype=np.float32)
    for c in np.unique(lbl):
        if c >= 19:
            continue
        m = lbl == c
        v = np.zeros(int(m.sum()), dtype=np.float32)
        for bank, weight in ((0, 1.0 - mix), (1, mix)):
            if weight > 0:
                angle, period = _STRIPES[bank, c]
                v += weight * np.sin(2 * np.pi * (xx[m] * np.cos(angle) + yy[m] * np.sin(angle)) / period + phase[c])
        out[m] = v
    return out


def _lighting(rng: np.random.Generator, h: int, w: int, strength: float) -> np.ndarray:
    """Multiplicative in-image lighting (about 1 +- strength): smooth field, ramp, cast shadows."""
    field = 0.5 * np.clip(_lowfreq(rng, h, w, 3), -1.0, 1.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0.0, 2 * np.pi)
    ramp = (xx / w - 0.5) * np.cos(a) + (yy / h - 0.5) * np.sin(a)
    gain = 1.0 + strength * (field + ramp)
    shadow = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):  # hard-edged quadrilaterals, as cast by buildings or trees
        pts = np.stack([rng.uniform(-0.2, 1.2, 4) * w, rng.uniform(0.2, 1.1, 4) * h], 1).astype(np.int32)
        cv2.fillConvexPoly(shadow, cv2.convexHull(pts), 1)
    gain[shadow > 0] *= 1.0 - 0.7 * strength
    return np.clip(gain, 0.15, None).astype(np.float32)


def paint(rng: np.random.Generator, lbl: np.ndarray, style: DomainStyle) -> np.ndarray:
    """Render an RGB uint8 image of a train-id map in a domain's style."""
    h, w = lbl.shape
    colours = np.vstack([_BASE_COLOURS, np.full((256 - 19, 3), 90.0, dtype=np.float32)])
    colours[:19] += np.asarray(style.offset, dtype=np.float32)
    # Per-image jitter of the class colours (lighting of this scene).
    colours[:19] += rng.normal(0.0, 6.0, size=(19, 3)).astype(np.float32)
    img = colours[lbl]
    tex = _lowfreq(rng, h, w, 8) * style.texture
    img += tex[..., None]
    if style.pattern > 0:
        img += (style.pattern * _stripes(rng, lbl, style.pattern_mix))[..., None]
    # Windows on buildings, lane markings on the road, gradient in the sky.
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(4, h // 16)
    windows = (lbl == BUILDING) & ((yy % period) < period // 2) & ((xx % period) < period // 2)
    img[windows] *= 0.65
    marks = (lbl == ROAD) & (np.abs(xx - w / 2) < max(1, w // 100)) & ((yy // period) % 2 == 0)
    img[marks] = 225.0
    sky = lbl == SKY
    img[sky] += (yy[sky, None] / h * 40.0).astype(np.float32)
    img = (img - 128.0) * style.contrast + 128.0
    img *= style.gain * rng.uniform(0.9, 1.1)
    if style.shading > 0:
        img *= _lighting(rng, h, w, style.shading)[..., None]
    img += rng.normal(0.0, style.noise, size=img.shape).astype(np.float32)
    img = np.clip(img, 0, 255)
    img = 255.0 * (img / 255.0) ** style.gamma
    if style.tint > 0:  # this image's white balance, saturation and exposure
        hsv = cv2.cvtColor(np.ascontiguousarray(img / 255.0, dtype=np.float32), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + 360.0 * rng.uniform(-style.tint, style.tint)) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - 2.5 * style.tint, 1 + 2.5 * style.tint), 0.0, 1.0)
        hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(1 - 2.5 * style.tint, 1 + 2.5 * style.tint), 0.0, 1.0)
        img = 255.0 * cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if style.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), style.blur)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def train_ids_to_cityscapes(lbl: np.ndarray, rng: np.random.Generator,
                            ego_vehicle: bool = False) -> np.ndarray:
    """Train-id map -> Cityscapes label ids; void pixels get void ids (0, 4, 5, 6)."""
    table = np.zeros(256, dtype=np.uint8)
    table[:19] = np.asarray(CITYSCAPES_IDS[19], dtype=np.uint8)
    table[VOID] = int(rng.choice(_VOID_IDS))
    ids = table[lbl]
    if ego_vehicle:
        ids[-max(1, lbl.shape[0] // 20):] = 1
    return ids


def train_ids_to_synthia(lbl: np.ndarray) -> np.ndarray:
    """Train-id map -> SYNTHIA class ids (terrain, truck, train, void -> 0 = void)."""
    table = np.zeros(256, dtype=np.uint16)
    for k, name in enumerate(CLASS_NAMES_16):
        table[CLASS_NAMES_19.index(name)] = SYNTHIA_IDS[16][k]
    return table[lbl]


def _write_rgb(path: str, img: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _write_palette_label(path: str, ids: np.ndarray) -> None:
    """Label ids as a palette PNG, like the real GTA5 labels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(ids)
    pal = np.zeros((256, 3), dtype=np.uint8)
    for tid, cid in enumerate(CITYSCAPES_IDS[19]):
        pal[cid] = PALETTE[tid]
    im.putpalette(pal.reshape(-1).tolist())  # turns the "L" image into "P"
    im.save(path)


def _write_grey_label(path: str, ids: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(ids).save(path)


def generate(
    out: str | os.PathLike[str],
    seed: int = 0,
    size: Sequence[int] = (256, 128),
    num_source: int = 12,
    num_target_train: int = 6,
    num_target_val: int = 4,
    synthia: bool = False,
    gap: float = 1.0,
    gap_kind: str = "colour",
    tint: float = 0.0,
) -> dict[str, str]:
    """Write the synthetic trees under ``out``; return their roots by name.

    ``size`` is ``(W, H)``; ``gap`` scales the target's appearance difference from the
    source (:func:`target_style`) and ``gap_kind`` chooses what differs (``"colour"``: palette,
    global lighting, noise, blur; ``"filter"``: noise, blur, in-image lighting; ``"texture"``:
    also the per-class stripes); ``tint`` > 0 gives every image of both domains its own colour
    (:class:`DomainStyle` ``tint``). Returns ``{"gta5": ..., "cityscapes": ..., ["synthia": ...]}``.
    """
    import scipy.io

    if tint < 0:
        raise ValueError(f"tint must be >= 0, got {tint}")
    src_style = dataclasses.replace(source_style(gap_kind), tint=tint)
    out = os.fspath(out)
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError(f"size must be at least 16x16, got {width}x{height}")
    root_rng = np.random.default_rng(seed)
    rngs = root_rng.spawn(3)
    roots = {"gta5": os.path.join(out, "gta5"), "cityscapes": os.path.join(out, "cityscapes")}

    # Source (GTA5 layout).
    rng = rngs[0]
    for i in range(num_source):
        lbl = render_scene(rng, width, height, must_have=[_OBJECT_CYCLE[i % len(_OBJECT_CYCLE)]])
        name = f"{i + 1:05d}.png"
        _write_rgb(os.path.join(roots["gta5"], "images", name), paint(rng, lbl, src_style))
        _write_palette_label(os.path.join(roots["gta5"], "labels", name),
                             train_ids_to_cityscapes(lbl, rng))
    ids = np.arange(1, num_source + 1)
    n_val = num_source // 6
    n_test = num_source // 6
    n_train = num_source - n_val - n_test
    scipy.io.savemat(
        os.path.join(roots["gta5"], "split.mat"),
        {
            "trainIds": ids[:n_train].reshape(-1, 1),
            "valIds": ids[n_train:n_train + n_val].reshape(-1, 1),
            "testIds": ids[n_train + n_val:].reshape(-1, 1),
        },
    )
    label_to_file, file_to_label = label_info_from_folder(os.path.join(roots["gta5"], "labels"))
    save_label_info(os.path.join(roots["gta5"], "gtav_label_info.p"), label_to_file,
                    file_to_label)

    # Target (Cityscapes layout).
    rng = rngs[1]
    style = dataclasses.replace(target_style(gap, gap_kind), tint=tint)
    cities = {"train": ("aachen", "bochum", "bremen"), "val": ("frankfurt", "lindau", "munster")}
    counts = {"train": num_target_train, "val": num_target_val}
    k = 0
    for split in ("train", "val"):
        split_cities = cities[split][: 3 if counts[split] >= 6 else 2]
        for i in range(counts[split]):
            city = split_cities[i % len(split_cities)]
            stem = f"{city}_{i // len(split_cities):06d}_000019"
            lbl = render_scene(rng, width, height, must_have=[_OBJECT_CYCLE[k % len(_OBJECT_CYCLE)]])
            k += 1
            _write_rgb(os.path.join(roots["cityscapes"], "leftImg8bit", split, city,
                                    f"{stem}_leftImg8bit.png"), paint(rng, lbl, style))
            _write_grey_label(os.path.join(roots["cityscapes"], "gtFine", split, city,
                                           f"{stem}_gtFine_labelIds.png"),
                              train_ids_to_cityscapes(lbl, rng, ego_vehicle=True))

    if synthia:
        roots["synthia"] = os.path.join(out, "synthia")
        rng = rngs[2]
        for i in range(num_source):
            lbl = render_scene(rng, width, height, must_have=[_OBJECT_CYCLE[i % len(_OBJECT_CYCLE)]])
            name = f"{i:07d}.png"
            _write_rgb(os.path.join(roots["synthia"], "RGB", name), paint(rng, lbl, _SYNTHIA_STYLE))
            gt = np.zeros((height, width, 3), dtype=np.uint16)  # B, G, R as cv2 writes
            gt[:, :, 2] = train_ids_to_synthia(lbl)
            gt[:, :, 1] = rng.integers(0, 1000, size=(height, width), dtype=np.uint16)
            path = os.path.join(roots["synthia"], "GT", "LABELS", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not cv2.imwrite(path, gt):
                raise OSError(f"could not write {path}")
    return roots


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W,H, got {text!r}") from None
    return w, h


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python3 -m datasets.synthetic``."""
    parser = argparse.ArgumentParser(prog="python3 -m datasets.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_parse_size, default=(256, 128), help="W,H")
    parser.add_argument("--num_source", type=int, default=12)
    parser.add_argument("--num_target_train", type=int, default=6)
    parser.add_argument("--num_target_val", type=int, default=4)
    parser.add_argument("--synthia", action="store_true", help="also write a SYNTHIA tree")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="target appearance: 1 the usual domain gap, 0 painted like the source, 0.5 half-way")
    parser.add_argument("--gap_kind", choices=GAP_KINDS, default="colour",
                        help="what the domains differ in: colour (default): palette, global lighting, noise, blur; "
                             "filter: same palette and per-class stripes, more noise, blur, in-image lighting; "
                             "texture: as filter, and other per-class stripes")
    parser.add_argument("--tint", type=float, default=0.0,
                        help="per-image colour variation in both domains (hue shift up to +-TINT of the circle, "
                             "saturation and value x(1 +- 2.5 TINT)); default 0: none")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    roots = generate(args.out, args.seed, args.size, args.num_source, args.num_target_train,
                     args.num_target_val, args.synthia, gap=args.gap, gap_kind=args.gap_kind,
                     tint=args.tint)
    for name, path in roots.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
