"""Sweep orchestration: the Ray Train glue, the Tune searcher and scheduler, what runs in each
trial, the driver and its manifest, and :mod:`clipray.sweep.tracking`, the only MLflow code."""
