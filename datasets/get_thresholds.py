"""Offline class thresholds for phase 2 from saved soft labels (docs/METHOD.md section 5).

Usage, exactly as the original::

    cd datasets && python3 get_thresholds.py 0.8 gta2city_soft_labels

writes ``./gta2city_soft_labels_thresholds_p0.8.npy`` (one float32 value per class, the original's
dtype). As the original, the file is ``./FOLDER_thresholds_pP.npy`` relative to the working
directory, with ``P`` as Python prints the float: from the repository root,
``python3 datasets/get_thresholds.py 0.8 datasets/gta2city_soft_labels`` writes
``datasets/gta2city_soft_labels_thresholds_p0.8.npy``, the file the README's phase-2 command
reads. Two cases the original gets wrong are handled: a trailing ``/`` on FOLDER is dropped (the
original would write ``FOLDER/_thresholds_pP.npy`` inside the soft-label folder), and an
absolute FOLDER gives ``FOLDER_thresholds_pP.npy`` next to it (the original prefixes ``./``,
which turns ``/data/soft`` into ``./data/soft`` under the working directory). Also runs as
``python3 -m datasets.get_thresholds P FOLDER``; ``--output PATH`` chooses the file,
``--num-classes`` checks the class count (taken from the files, as the original: 16 for
SYNTHIA soft labels, 19 for GTA5's) and ``--quiet`` hides the progress bars and the printed
lines. Printed after the file: per class, the threshold, the pixels whose argmax is the
class and the fraction of them kept at ``P`` (winning probability >= threshold). The file is
written atomically, with the permissions of an ordinary new file (0644 under umask 022).

Beside it, as every script's ``<stage>_args.json`` and ``<stage>_env.json``
(:mod:`engine.provenance`, docs/RELIABILITY.md "What makes runs comparable"): ``OUTPUT_args.json``
(the arguments and the output path) and ``OUTPUT_env.json`` (code, versions, the soft-label
folder's file count and fingerprint), ``OUTPUT`` being the output path without ``.npy``. Named
after the output, not ``thresholds_*.json``: several thresholds files share one folder (the
README writes them all into ``datasets/``), and each keeps its own record.

The computation (docs/METHOD.md section 5) is :mod:`stages.offline_thresholds`.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

if __package__ in (None, ""):
    # Run as a file (``cd datasets && python3 get_thresholds.py``, the original's command): Python put
    # datasets/ on sys.path, not the repository root that holds the packages imported below.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from engine import provenance
from stages.offline_thresholds import (
    ThresholdsError,
    build_parser,
    compute_thresholds,
    default_output_name,
    format_report,
)
from utils.files import atomic_save_npy

STAGE = "thresholds"


def record_stem(output: str) -> str:
    """``OUTPUT`` without ``.npy``: the records are ``<stem>_args.json`` and ``<stem>_env.json``."""
    return output.removesuffix(".npy")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of docs/METHOD.md section 5; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    output = args.output if args.output is not None else default_output_name(args.folder, args.p)
    data = provenance.data_fingerprints({"soft_labels": (args.folder, "soft_labels")})  # what is read
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report: dict = {}
            thresholds = compute_thresholds(args.folder, args.p, args.num_classes, progress=not args.quiet,
                                            report=report)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if args.p == 0:
            print("warning: P = 0: each threshold is its class's highest probability (as the original), "
                  "so phase 2 keeps almost no pixel", file=sys.stderr)
        atomic_save_npy(thresholds.astype(np.float32, copy=False), output)
    except ThresholdsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stem = record_stem(output)
    try:
        rank = provenance.rank_record(0, "cpu")  # NumPy on the CPU, one process
        provenance.write_records(stem, {**provenance.args_record(args), "output": output},
                                 provenance.environment(STAGE, [rank], data))
    except OSError as exc:
        print(f"error: cannot write {stem}_args.json / {stem}_env.json: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"saved {output}: " + " ".join(f"{v:.4f}" for v in thresholds))
        print(format_report(thresholds, report, args.p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
