"""Benchmarks and the slow reference rules they compare against."""
