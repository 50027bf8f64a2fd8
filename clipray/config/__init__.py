"""Configuration layer: the experiment schema, loading and overrides, search spaces, and the
registries a config is checked against (model architectures, corruption names).

Imports nothing else of clipray, and never torch models, Ray or MLflow.
"""
