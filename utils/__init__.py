"""Leaf helpers that import nothing from the rest of the project: checkpoint I/O, distributed
set-up, metrics, and the method's numeric kernels (online class thresholds, phase-2 pseudo labels)."""
