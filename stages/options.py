"""The parser of each script: the engine's shared flags plus the flags each stage declares
beside itself (``add_arguments`` in ``stages/phase1.py``, ``stages/phase2.py``,
``stages/soft_labels.py``, ``stages/evaluation.py``); docs/METHOD.md section 7.

Every script accepts the phase flags, as the original's scripts share one argument list; only
their own stage reads them. ``--help`` lists the groups run, data, model, optimisation,
phase 1, phase 2 / soft labels, evaluation (``evaluate.py`` only) and ignored.
"""

from __future__ import annotations

import argparse

from engine.options import (
    TRAINING_STAGES,
    OptionError,
    add_ignored_arguments,
    add_shared_arguments,
    finalize_shared,
    new_parser,
)
from stages import evaluation, phase1, phase2, soft_labels, source_only

STAGES = ("phase1", "phase2", "soft_label", "source_only", "evaluate")

# Per script, its defaults of the shared flags --learning-rate, --num-steps, --num-steps-stop,
# --clrjit_params and --resume.
DEFAULTS = {
    "phase1": phase1.FLAG_DEFAULTS,
    "phase2": phase2.FLAG_DEFAULTS,
    "soft_label": soft_labels.FLAG_DEFAULTS,
    "source_only": source_only.FLAG_DEFAULTS,
    "evaluate": evaluation.FLAG_DEFAULTS,
}


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The parser of one script; ``stage`` is one of :data:`STAGES`."""
    parser = new_parser(description)
    add_shared_arguments(parser, DEFAULTS[stage], training=stage in TRAINING_STAGES)
    phase1.add_arguments(parser.add_argument_group("phase 1"))
    group = parser.add_argument_group("phase 2 / soft labels")
    phase2.add_arguments(group)
    soft_labels.add_arguments(group)
    if stage == "evaluate":
        evaluation.add_arguments(parser.add_argument_group("evaluation"))
    add_ignored_arguments(parser)
    return parser


def finalize(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Parse compound values and check them; raises :class:`OptionError` naming the flag."""
    args.stage = stage
    finalize_shared(args, training=stage in TRAINING_STAGES)
    phase1.check_arguments(args)  # every script takes --conf_p (see the module docstring)
    if stage == "evaluate":
        evaluation.check_arguments(args)
    return args


def parse_args(stage: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options, finalized; a bad value exits with status 2 and one ``error:`` line."""
    parser = build_parser(stage, description)
    args = parser.parse_args(argv)
    try:
        return finalize(args, stage)
    except OptionError as exc:
        parser.exit(2, f"error: {exc}\n")
