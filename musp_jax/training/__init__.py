"""Training: the staged driver, checkpoints, the config check, evaluation of a model, attention scores, figures."""
