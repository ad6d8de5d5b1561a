"""The method: one module per step of the pipeline (source-only, phase 1, soft labels, phase 2,
evaluation), their losses and the pseudo-label monitor. Each builds on ``engine``."""
