"""Training: the staged driver, checkpoints, the config check, evaluation of a model on a
dataset, attention scores, figures and a model's pictures."""
