"""Optimizer and learning-rate schedule of the official MUSP recipe (docs/design.md
section 3).

Adam with PyTorch's coupled L2 weight decay: `weight_decay * param` is added to
the gradient before the Adam moments (torch.optim.Adam(weight_decay=...)), which
is not AdamW. The schedule is the official WarmupMultiStepLR, stepped once per
epoch: the learning rate is constant within an epoch.

The current base learning rate is kept in the optimizer state for logging:
`current_lr(opt_state)`.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from musp_jax.core.state import path_str


def make_schedule(optim_config: ml_collections.ConfigDict,
                  steps_per_epoch: int) -> optax.Schedule:
  """Step -> learning rate; `config.optim` lr, warmup_*, milestones, gamma."""
  if steps_per_epoch < 1:
    raise ValueError(f"make_schedule: steps_per_epoch must be >= 1, got {steps_per_epoch}")
  milestones = tuple(int(m) for m in optim_config.milestones)
  if list(milestones) != sorted(milestones):
    raise ValueError(
        f"config.optim.milestones must be increasing epochs, got {milestones}")
  base_lr = float(optim_config.lr)
  warmup_epochs = int(optim_config.warmup_epochs)
  warmup_factor = float(optim_config.warmup_factor)
  gamma = float(optim_config.gamma)

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    if warmup_epochs > 0:
      alpha = epoch / warmup_epochs
      warmup = jnp.where(epoch < warmup_epochs,
                         warmup_factor * (1.0 - alpha) + alpha, 1.0)
    else:
      warmup = 1.0
    # bisect_right: a milestone takes effect at the start of its own epoch.
    num_decays = sum((epoch >= m).astype(jnp.int32) for m in milestones)
    return base_lr * warmup * gamma ** num_decays

  return schedule


def decay_mask(params, wd_exclude: str):
  """Tree of bools: True where weight decay applies (path not matching regex)."""
  pattern = re.compile(wd_exclude)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: pattern.search(path_str(path)) is None, params)


def param_labels(params, *, backbone_key: str, frozen_pattern: str):
  """Tree of "frozen" / "backbone" / "head" labels, by path.

  "frozen": the path matches `frozen_pattern` (empty: none);
  "backbone": the leaf lies under the top-level key `backbone_key`.
  """
  frozen = re.compile(frozen_pattern) if frozen_pattern else None

  def label(path, _):
    if frozen is not None and frozen.search(path_str(path)):
      return "frozen"
    return "backbone" if path_str(path[:1]) == backbone_key else "head"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, *,
                   backbone_key: str = "backbone",
                   frozen_pattern: str = "frozen_") -> optax.GradientTransformation:
  """Adam with coupled L2 decay, the per-epoch schedule and the options.

  Args:
    optim_config: `config.optim`. wd_exclude is a regex searched in paths like
      "backbone/bn1/scale" (empty: decay everything, the official setting);
      head_lr_mult scales the learning rate of every parameter outside the
      top-level `backbone_key` subtree; grad_clip > 0 clips the raw gradient's
      global norm before weight decay is added (as clip_grad_norm_ before
      optimizer.step() in PyTorch).
    steps_per_epoch: optimizer steps per epoch (docs/design.md section 3).
    backbone_key: the top-level parameter key of the backbone.
    frozen_pattern: regex on paths of parameters that are never updated (as
      requires_grad=False in PyTorch, where Adam's weight decay skips them too),
      e.g. the BNNeck's "frozen_bias". Empty: none.
  """
  schedule = make_schedule(optim_config, steps_per_epoch)
  head_lr_mult = float(optim_config.head_lr_mult)
  wd = float(optim_config.weight_decay)
  wd_exclude = optim_config.wd_exclude
  grad_clip = float(optim_config.grad_clip)

  def labels(params):
    if head_lr_mult != 1.0 and not (hasattr(params, "keys") and backbone_key in params):
      raise ValueError(
          f"config.optim.head_lr_mult={head_lr_mult} needs the backbone under the "
          f"top-level parameter key {backbone_key!r}; top-level keys: "
          f"{sorted(params) if hasattr(params, 'keys') else type(params).__name__}")
    return param_labels(params, backbone_key=backbone_key, frozen_pattern=frozen_pattern)

  def is_frozen(params):
    return jax.tree.map(lambda label: label == "frozen", labels(params))

  def decayed(params):
    frozen = is_frozen(params)
    excluded = decay_mask(params, wd_exclude) if wd_exclude else jax.tree.map(
        lambda _: True, params)
    return jax.tree.map(lambda d, f: d and not f, excluded, frozen)

  def factory(learning_rate):
    # Frozen parameters' gradients are dropped first, so that they count in
    # neither the clipping norm nor the Adam moments (as PyTorch's grad=None).
    parts = [optax.masked(optax.set_to_zero(), is_frozen)]
    if grad_clip > 0:
      parts.append(optax.clip_by_global_norm(grad_clip))
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=decayed))
    parts.append(optax.scale_by_adam(
        b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
    parts.append(optax.multi_transform(
        {"backbone": optax.scale_by_learning_rate(learning_rate),
         "head": optax.scale_by_learning_rate(learning_rate * head_lr_mult),
         "frozen": optax.set_to_zero()},
        labels))
    return optax.chain(*parts)

  # inject_hyperparams evaluates the schedule at each step and keeps the value
  # in the state, so the driver can log it.
  return optax.inject_hyperparams(factory)(learning_rate=schedule)


def current_lr(opt_state) -> jax.Array:
  """The base learning rate used by the last update (before head_lr_mult)."""
  return opt_state.hyperparams["learning_rate"]
