"""Shared helpers: metrics, online class thresholds, phase-2 pseudo labels and more."""
