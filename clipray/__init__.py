"""clipray: feature-level adversarial CLIP pretraining sweeps, scored on corrupted retrieval."""

__version__ = "0.1.0"
