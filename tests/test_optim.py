"""Optimizer and schedule against torch.optim.Adam and the official WarmupMultiStepLR."""

import bisect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import common
from musp_jax.core import optim


def _optim_config(**overrides):
  cfg = common.get_config().optim
  for key, value in overrides.items():
    if key not in cfg:
      raise KeyError(f"config.optim has no {key!r}")
    cfg[key] = value
  return cfg


class OfficialWarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
  """The official code's scheduler, re-stated: stepped once per epoch."""

  def __init__(self, optimizer, milestones, gamma, warmup_factor, warmup_iters):
    self.milestones, self.gamma = list(milestones), gamma
    self.warmup_factor, self.warmup_iters = warmup_factor, warmup_iters
    super().__init__(optimizer)

  def get_lr(self):
    factor = 1.0
    if self.last_epoch < self.warmup_iters:
      alpha = self.last_epoch / self.warmup_iters
      factor = self.warmup_factor * (1 - alpha) + alpha
    decay = self.gamma ** bisect.bisect_right(self.milestones, self.last_epoch)
    return [base_lr * factor * decay for base_lr in self.base_lrs]


# ---------------------------------------------------------------- schedule
def test_schedule_matches_official_at_every_epoch():
  cfg = _optim_config()  # lr 3.5e-4, warmup 10 from 0.1, milestones 30/60, 90 epochs
  steps_per_epoch = 7
  schedule = jax.jit(optim.make_schedule(cfg, steps_per_epoch))
  param = torch.nn.Parameter(torch.zeros(1))
  torch_opt = torch.optim.Adam([param], lr=cfg.lr)
  official = OfficialWarmupMultiStepLR(torch_opt, (30, 60), 0.1, 0.1, 10)
  expected, got = [], []
  for epoch in range(cfg.num_epochs):
    lr = torch_opt.param_groups[0]["lr"]
    first, last = epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch - 1
    expected += [lr, lr]
    got += [float(schedule(first)), float(schedule(last))]
    torch_opt.step()  # no gradient: a no-op that keeps torch's call order check happy
    official.step()
  # The schedule is a few float32 multiplications of lr (a float32 rounding each, 6e-8)
  # against torch's float64 Python floats: rtol=1e-6.
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # The landmarks, by hand (float64 on both sides: 1e-12).
  np.testing.assert_allclose(expected[0], 3.5e-5, rtol=1e-12)
  np.testing.assert_allclose(expected[2 * 9], 3.5e-4 * (0.1 * 0.1 + 0.9), rtol=1e-12)
  np.testing.assert_allclose(expected[2 * 10], 3.5e-4, rtol=1e-12)
  np.testing.assert_allclose(expected[2 * 30], 3.5e-5, rtol=1e-12)
  np.testing.assert_allclose(expected[2 * 89], 3.5e-6, rtol=1e-12)


def test_schedule_without_warmup_or_milestones():
  cfg = _optim_config(warmup_epochs=0, milestones=(), lr=1e-3)
  schedule = optim.make_schedule(cfg, 3)
  # float32 1e-3 against the float64 literal: one rounding, 6e-8.
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 3, 100)], [1e-3] * 4, rtol=1e-6)


def test_schedule_rejects_bad_values():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.make_schedule(_optim_config(), 0)
  with pytest.raises(ValueError, match="milestones"):
    optim.make_schedule(_optim_config(milestones=(60, 30)), 5)


# ---------------------------------------------------------------- Adam vs torch
def _toy_problem(seed=0):
  """A small regression net with a backbone / head split and a frozen bias."""
  rng = np.random.default_rng(seed)
  params = {
      "backbone": {
          "conv": {"kernel": rng.normal(size=(6, 8)) * 0.5, "bias": rng.normal(size=(8,)) * 0.1},
          "bn": {"scale": 1 + 0.1 * rng.normal(size=(8,))},
      },
      "head": {
          "classifier": {"kernel": rng.normal(size=(8, 3)) * 0.5},
          "neck": {"frozen_bias": rng.normal(size=(3,)) * 0.1},
      },
  }
  params = jax.tree.map(lambda a: a.astype(np.float32), params)
  x = rng.normal(size=(16, 6)).astype(np.float32)
  y = rng.normal(size=(16, 3)).astype(np.float32)
  return params, x, y


def _forward(p, x, y, lib):
  tanh = jnp.tanh if lib is jnp else torch.tanh
  h = tanh(x @ p["backbone"]["conv"]["kernel"] + p["backbone"]["conv"]["bias"])
  h = h * p["backbone"]["bn"]["scale"]
  out = h @ p["head"]["classifier"]["kernel"] + p["head"]["neck"]["frozen_bias"]
  return ((out - y) ** 2).mean()


def _run_jax(cfg, steps_per_epoch, num_steps, seed=0):
  params, x, y = _toy_problem(seed)
  tx = optim.make_optimizer(cfg, steps_per_epoch)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_forward)(params, x, y, jnp)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  trajectory, lrs = [], []
  for _ in range(num_steps):
    params, state = step(params, state)
    trajectory.append(jax.tree.map(np.asarray, params))
    lrs.append(float(optim.current_lr(state)))
  return trajectory, lrs


def _run_torch(cfg, steps_per_epoch, num_steps, *, decayed, head_lr_mult, seed=0,
               clip=0.0):
  """torch.optim.Adam with param groups; `decayed(path)` says who gets weight decay."""
  params, x, y = _toy_problem(seed)
  tensors = jax.tree.map(lambda a: torch.tensor(a, requires_grad=True), params)
  flat = {
      "backbone/conv/kernel": tensors["backbone"]["conv"]["kernel"],
      "backbone/conv/bias": tensors["backbone"]["conv"]["bias"],
      "backbone/bn/scale": tensors["backbone"]["bn"]["scale"],
      "head/classifier/kernel": tensors["head"]["classifier"]["kernel"],
  }
  # As the official BNNeck: the bias is not trained at all.
  tensors["head"]["neck"]["frozen_bias"].requires_grad_(False)
  groups = []
  for path, tensor in flat.items():
    lr = cfg.lr * (1.0 if path.startswith("backbone/") else head_lr_mult)
    groups.append({"params": [tensor], "lr": lr,
                   "weight_decay": cfg.weight_decay if decayed(path) else 0.0})
  opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  sched = OfficialWarmupMultiStepLR(opt, cfg.milestones, cfg.gamma, cfg.warmup_factor,
                                    cfg.warmup_epochs)
  xt, yt = torch.tensor(x), torch.tensor(y)
  trajectory, lrs = [], []
  for i in range(num_steps):
    opt.zero_grad()
    _forward(tensors, xt, yt, torch).backward()
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(list(flat.values()), clip)
    lrs.append(opt.param_groups[0]["lr"])
    opt.step()
    if (i + 1) % steps_per_epoch == 0:
      sched.step()
    trajectory.append(jax.tree.map(lambda t: t.detach().numpy().copy(), tensors))
  return trajectory, lrs


def _max_error(traj_a, traj_b):
  return max(
      float(np.max(np.abs(a - b)))
      for pa, pb in zip(traj_a, traj_b)
      for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


_SCHEDULE = dict(lr=1e-2, warmup_epochs=3, warmup_factor=0.1, milestones=(5, 8), gamma=0.1)


@pytest.mark.numerics
def test_adam_matches_torch_default_recipe():
  cfg = _optim_config(**_SCHEDULE)  # weight_decay 5e-4 on everything, eps 1e-8
  jax_traj, jax_lrs = _run_jax(cfg, steps_per_epoch=2, num_steps=20)
  torch_traj, torch_lrs = _run_torch(cfg, 2, 20, decayed=lambda p: True, head_lr_mult=1.0)
  np.testing.assert_allclose(jax_lrs, torch_lrs, rtol=1e-6)  # as in the schedule test
  assert len(set(np.round(torch_lrs, 9))) > 3, "the schedule must change over the run"
  # 20 Adam steps at lr <= 1e-2 from float32 gradients of torch and XLA (relative
  # difference ~1e-6): each step's parameter difference is ~lr x 1e-6; measured 6.6e-7
  # (AVX2 and AVX).
  assert _max_error(jax_traj, torch_traj) < 1e-5
  # The parameters did move (by far more than the tolerance).
  start, _, _ = _toy_problem()
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), start, jax_traj[-1])
  assert moved["backbone"]["conv"]["kernel"] > 1e-2
  assert moved["head"]["neck"]["frozen_bias"] == 0.0


def test_adam_differs_from_adamw():
  # Guards against decoupled decay: the coupled L2 term goes through Adam's scaling.
  cfg = _optim_config(**_SCHEDULE, weight_decay=0.5)
  jax_traj, _ = _run_jax(cfg, 2, 20)
  torch_traj, _ = _run_torch(cfg, 2, 20, decayed=lambda p: True, head_lr_mult=1.0)
  assert _max_error(jax_traj, torch_traj) < 1e-5  # as above; measured 7.2e-7
  params, x, y = _toy_problem()
  adamw = optax.adamw(1e-2, weight_decay=0.5)
  state = adamw.init(params)

  @jax.jit
  def adamw_step(params, state):
    grads = jax.grad(_forward)(params, x, y, jnp)
    updates, state = adamw.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = adamw_step(params, state)
  assert _max_error([params], [jax_traj[2]]) > 1e-4


def test_adam_options_match_torch_param_groups():
  cfg = _optim_config(**_SCHEDULE, wd_exclude=r"bias|scale", head_lr_mult=10.0,
                      grad_clip=0.05, weight_decay=1e-2)
  jax_traj, _ = _run_jax(cfg, steps_per_epoch=2, num_steps=20)
  torch_traj, _ = _run_torch(cfg, 2, 20, decayed=lambda p: not p.endswith(("bias", "scale")),
                             head_lr_mult=10.0, clip=0.05)
  # As above, and torch clips by clip / (norm + 1e-6) where optax divides by the norm:
  # measured 4.8e-6 on AVX2 and AVX alike (the same in both: not rounding).
  assert _max_error(jax_traj, torch_traj) < 1e-5
  # Each option matters on this problem: dropping any one breaks the match.
  for change in (dict(wd_exclude=""), dict(head_lr_mult=1.0), dict(grad_clip=0.0)):
    other = _optim_config(**{**_SCHEDULE, "wd_exclude": r"bias|scale", "head_lr_mult": 10.0,
                             "grad_clip": 0.05, "weight_decay": 1e-2, **change})
    other_traj, _ = _run_jax(other, 2, 20)
    assert _max_error(other_traj, torch_traj) > 1e-4, change


def test_head_lr_mult_needs_the_backbone_key():
  cfg = _optim_config(head_lr_mult=10.0)
  tx = optim.make_optimizer(cfg, 5, backbone_key="encoder")
  with pytest.raises(ValueError, match="'encoder'"):
    tx.init({"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}})


def test_param_labels_and_decay_mask():
  params, _, _ = _toy_problem()
  labels = optim.param_labels(params, backbone_key="backbone", frozen_pattern="frozen_")
  assert labels["backbone"]["conv"]["kernel"] == "backbone"
  assert labels["head"]["classifier"]["kernel"] == "head"
  assert labels["head"]["neck"]["frozen_bias"] == "frozen"
  mask = optim.decay_mask(params, r"/bias$|scale")
  assert mask["backbone"]["conv"]["kernel"] and mask["head"]["neck"]["frozen_bias"]
  assert not mask["backbone"]["conv"]["bias"] and not mask["backbone"]["bn"]["scale"]
