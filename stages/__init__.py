"""The method: one module per step of the pipeline (source-only, phase 1, soft labels, offline
class thresholds, phase 2, evaluation), their losses and the pseudo-label monitor. Each builds on
``engine`` (the offline thresholds on ``datasets`` and ``utils`` only)."""
