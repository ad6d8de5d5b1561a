"""Leaf helpers that import nothing from the rest of the project: the one atomic file writer
(files.py), test-only fault injection (faults.py), checkpoint I/O, distributed set-up, metrics, and
the method's numeric kernels (online class thresholds, phase-2 pseudo labels)."""
