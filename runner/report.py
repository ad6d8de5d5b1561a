"""The report of a run folder, computed from the runs only (docs/PIPELINE.md, "The report").

``report.json`` keeps this shape for other tools (mIoU and IoU in percent)::

    {"stages": {"<stage>/<best|final>": {"seeds": {"<seed>": {"miou": float, "iou": [float, ...]}},
                                         "miou_mean": float, "miou_std": float | null, "n": int,
                                         "iou_mean": [...], "iou_std": [...]}},
     "classes": [...], "pseudo_labels": {...}, "time": {...}, "deterministic": bool, ...}

The per-class lists are in the order of the paper's tables (the Cityscapes train ids: road,
sidewalk, building, ...). ``miou_std`` is the sample standard deviation (``null`` for one seed).
16-class (SYNTHIA) runs add ``miou16`` / ``miou13`` per seed and their means. No figure of the
paper is typed in here: every number comes from an ``evaluate.py`` results file, a training
stage's ``metrics.jsonl``, ``<stage>_args.json`` or the runner's ``pipeline_stage.json``.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
from typing import Any

from runner.execute import MARKER
from runner.recipe import TRAINING_KINDS
from utils.files import atomic_write

RUN_FILE = "pipeline_run.json"  # what pipeline.py ran: recipe, seeds, stage kinds


def _load(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _columns(rows: list[list[float]]) -> tuple[list[float], list[float | None]]:
    means, stds = [], []
    for column in zip(*rows):
        m, s = _mean_std(list(column))
        means.append(m)
        stds.append(s)
    return means, stds


def pseudo_label_accuracy(metrics_path: str) -> dict | None:
    """Pooled pseudo-label accuracy and mean kept fraction (percent) of one training run's
    ``metrics.jsonl`` (``None`` when it has no ``pseudo_acc``: no target ground truth, or source-only)."""
    if not os.path.isfile(metrics_path):
        return None
    with open(metrics_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("pseudo_acc") is not None]
    pixels = sum(r.get("pseudo_acc_pixels", 0) for r in rows)
    if not rows or not pixels:
        return None
    acc = sum(r["pseudo_acc"] * r["pseudo_acc_pixels"] for r in rows) / pixels
    kept = statistics.fmean(r["pseudo_kept"] for r in rows if r.get("pseudo_kept") is not None)
    return {"acc": 100.0 * acc, "kept": 100.0 * kept}


def _deterministic(folder: str) -> bool:
    found = glob.glob(os.path.join(folder, "*_args.json"))
    return bool(found) and bool(_load(found[0]).get("deterministic", False))


def collect(out: str) -> dict:
    """The report of the run folder ``out`` (see the module docstring)."""
    run = _load(os.path.join(out, RUN_FILE))
    seeds = [str(s) for s in run["seeds"]]
    kinds: dict[str, str] = run["kinds"]
    evaluated: dict[str, dict[str, dict]] = {}  # "phase1/best" -> seed -> results.json
    classes: list[str] = []
    pseudo: dict[str, dict[str, dict]] = {}
    times: dict[str, dict[str, dict]] = {}
    deterministic: dict[str, bool] = {}
    for seed in seeds:
        seed_dir = os.path.join(out, f"seed_{seed}")
        for name, kind in kinds.items():
            if kind == "evaluate":
                for checkpoint in run["checkpoints"][name]:  # in the recipe's order
                    folder = os.path.join(seed_dir, name, checkpoint.replace(".", "_"))
                    results, marker = os.path.join(folder, "results.json"), os.path.join(folder, MARKER)
                    if not os.path.isfile(results) or _load(marker).get("state") != "finished":
                        continue
                    key = checkpoint.replace(".", "/") + ("" if name == "evaluate" else f"@{name}")
                    data = _load(results)
                    classes = list(data["iou"])
                    evaluated.setdefault(key, {})[seed] = data
                continue
            marker_path = os.path.join(seed_dir, name, MARKER)
            if not os.path.isfile(marker_path):
                continue
            marker = _load(marker_path)
            if marker.get("state") != "finished":
                continue
            hours = marker["seconds"] * marker.get("gpus", 0) / 3600.0
            times.setdefault(name, {})[seed] = {"seconds": marker["seconds"], "gpu_hours": hours}
            if kind in TRAINING_KINDS:
                deterministic[f"seed_{seed}/{name}"] = _deterministic(os.path.join(seed_dir, name))
                acc = pseudo_label_accuracy(os.path.join(seed_dir, name, "metrics.jsonl"))
                if acc is not None:
                    pseudo.setdefault(name, {})[seed] = acc
    stages: dict[str, dict] = {}
    for key, by_seed in evaluated.items():
        entry: dict[str, Any] = {"seeds": {}}
        for seed, data in by_seed.items():
            row = {"miou": 100.0 * data["miou"], "iou": [100.0 * data["iou"][c] for c in classes]}
            for sub in ("miou16", "miou13"):
                if sub in data:
                    row[sub] = 100.0 * data[sub]
            entry["seeds"][seed] = row
        rows = list(entry["seeds"].values())
        entry["miou_mean"], entry["miou_std"] = _mean_std([r["miou"] for r in rows])
        entry["n"] = len(rows)
        entry["iou_mean"], entry["iou_std"] = _columns([r["iou"] for r in rows])
        for sub in ("miou16", "miou13"):
            if all(sub in r for r in rows):
                entry[f"{sub}_mean"], entry[f"{sub}_std"] = _mean_std([r[sub] for r in rows])
        entry["checkpoints"] = {seed: data["checkpoint"] for seed, data in by_seed.items()}
        stages[key] = entry
    pseudo_out = {}
    for name, by_seed in pseudo.items():
        m, s = _mean_std([v["acc"] for v in by_seed.values()])
        pseudo_out[name] = {"seeds": by_seed, "acc_mean": m, "acc_std": s, "n": len(by_seed)}
    time_out = {}
    for name, by_seed in times.items():
        time_out[name] = {"seeds": by_seed, "seconds_mean": statistics.fmean(v["seconds"] for v in by_seed.values()),
                          "gpu_hours_total": sum(v["gpu_hours"] for v in by_seed.values())}
    return {"recipe": run["recipe"], "description": run.get("description", ""), "seeds": seeds,
            "classes": classes, "stages": stages, "pseudo_labels": pseudo_out, "time": time_out,
            "deterministic": bool(deterministic) and all(deterministic.values()),
            "deterministic_runs": deterministic}


# ---------------------------------------------------------------------------- text
def _pm(mean: float, std: float | None, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(report: dict) -> str:
    """``report.md``: mIoU per seed and over seeds, per-class IoU, pseudo labels, time."""
    seeds = report["seeds"]
    lines = [f"# Report: {report['recipe']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    det = "yes" if report["deterministic"] else "no"
    lines += [(f"Seeds: {', '.join(seeds)}. Deterministic (`--deterministic` on every training stage): {det}. "
               "mIoU and IoU in percent on the target validation split (`evaluate.py`); ± is the sample standard "
               "deviation over seeds."), ""]
    sixteen = any("miou16_mean" in e for e in report["stages"].values())
    head = "| checkpoint | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | n |"
    head += " mIoU-16 | mIoU*-13 |" if sixteen else ""
    lines += ["## mIoU", "", head, "|---|" + "---:|" * (len(seeds) + 2) + ("---:|---:|" if sixteen else "")]
    for key, e in report["stages"].items():
        cells = [f"{e['seeds'][s]['miou']:.2f}" if s in e["seeds"] else "–" for s in seeds]
        row = f"| {key} | " + " | ".join(cells) + f" | {_pm(e['miou_mean'], e['miou_std'], 2)} | {e['n']} |"
        if sixteen:
            row += "".join(f" {_pm(e[k + '_mean'], e[k + '_std'], 2)} |" if k + "_mean" in e else " – |"
                           for k in ("miou16", "miou13"))
        lines.append(row)
    classes = report["classes"]
    lines += ["", "## Per-class IoU (mean ± std over seeds)", "",
              "| checkpoint | " + " | ".join(classes) + " | mIoU |", "|---|" + "---:|" * (len(classes) + 1)]
    for key, e in report["stages"].items():
        cells = [_pm(m, s) for m, s in zip(e["iou_mean"], e["iou_std"])]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {_pm(e['miou_mean'], e['miou_std'])} |")
    if report["pseudo_labels"]:
        lines += ["", "## Pseudo-label accuracy", "",
                  ("Of the pixels each stage keeps as pseudo labels, the fraction that equals the target-train ground "
                   "truth (`pseudo_acc` in its `metrics.jsonl`, pooled over the run; monitoring only, no loss reads it)."),
                  "", "| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | kept (mean) |",
                  "|---|" + "---:|" * (len(seeds) + 2)]
        for name, p in report["pseudo_labels"].items():
            cells = [f"{p['seeds'][s]['acc']:.1f}" if s in p["seeds"] else "–" for s in seeds]
            kept = statistics.fmean(v["kept"] for v in p["seeds"].values())
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pm(p['acc_mean'], p['acc_std'])} | {kept:.1f} |")
    lines += ["", "## Time", "", "| stage | " + " | ".join(f"seed {s} (s)" for s in seeds) + " | GPU-hours (all seeds) |",
              "|---|" + "---:|" * (len(seeds) + 1)]
    for name, t in report["time"].items():
        cells = [f"{t['seeds'][s]['seconds']:.0f}" if s in t["seeds"] else "–" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {t['gpu_hours_total']:.2f} |")
    return "\n".join(lines) + "\n"


def latex(report: dict) -> str:
    """One table row per checkpoint as a paper prints it: per-class IoU and mIoU (means over seeds)."""
    classes = report["classes"]
    out = [f"% {report['recipe']}: seeds {', '.join(report['seeds'])}; columns: " + ", ".join(classes) + ", mIoU"]
    for key, e in report["stages"].items():
        miou = f"{e['miou_mean']:.1f}" if e["miou_std"] is None else f"{e['miou_mean']:.1f}$\\pm${e['miou_std']:.1f}"
        out.append(f"{key.replace('_', chr(92) + '_')} & " + " & ".join(f"{v:.1f}" for v in e["iou_mean"])
                   + f" & {miou} \\\\")
    return "\n".join(out) + "\n"


def write(out: str, with_latex: bool = False) -> dict:
    """Compute and write ``report.json`` and ``report.md`` (and ``report.tex``) into ``out``."""
    report = collect(out)
    atomic_write(os.path.join(out, "report.json"), lambda f: f.write(json.dumps(report, indent=2)), mode="w")
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write(markdown(report)), mode="w")
    if with_latex:
        atomic_write(os.path.join(out, "report.tex"), lambda f: f.write(latex(report)), mode="w")
    return report


def compare(folders: list[str]) -> str:
    """Two (or more) run folders side by side: mIoU per checkpoint, then per-class IoU differences."""
    reports = [collect(f) for f in folders]
    keys = list(dict.fromkeys(k for r in reports for k in r["stages"]))
    names = [os.path.basename(os.path.normpath(f)) or f for f in folders]
    lines = ["| checkpoint | " + " | ".join(f"{n} mIoU (n)" for n in names) + " | difference |",
             "|---|" + "---:|" * (len(names) + 1)]
    for key in keys:
        cells, means = [], []
        for r in reports:
            e = r["stages"].get(key)
            cells.append("–" if e is None else f"{_pm(e['miou_mean'], e['miou_std'], 2)} ({e['n']})")
            means.append(None if e is None else e["miou_mean"])
        diff = f"{means[-1] - means[0]:+.2f}" if None not in (means[0], means[-1]) else "–"
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {diff} |")
    classes = reports[0]["classes"]
    if all(r["classes"] == classes for r in reports) and len(reports) >= 2:
        lines += ["", f"Per-class IoU difference ({names[-1]} - {names[0]}):", "",
                  "| checkpoint | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        for key in keys:
            a, b = reports[0]["stages"].get(key), reports[-1]["stages"].get(key)
            if a and b:
                lines.append(f"| {key} | " + " | ".join(f"{y - x:+.1f}" for x, y in zip(a["iou_mean"], b["iou_mean"]))
                             + " |")
    return "\n".join(lines) + "\n"
