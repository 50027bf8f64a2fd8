"""Scoring layer: corruptions (imagecorruptions, made runnable and seeded), their on-disk cache,
what a pool scores and how results combine, result tables, and the Ray actor pool.

Only :mod:`clipray.scoring.pool` imports Ray; nothing here imports MLflow.
"""
