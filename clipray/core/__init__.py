"""Library core: data, model, towers, feature perturbation, losses, the training loop, embedding
and retrieval metrics. Plain torch; never imports Ray, MLflow or the orchestration layers."""
