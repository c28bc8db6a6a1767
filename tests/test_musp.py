"""MUSP / baseline heads and ReIDModel against a PyTorch restatement.

`TorchMUSPHead` restates the head from docs/design.md section 1 in PyTorch with the
official code's parameter names (key, value, c_.fc, neck.i, classifier.i); its
weights are imported into the Flax head and every output is compared.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from configs import common
from musp_jax import import_weights
from musp_jax.models import build_model
from musp_jax.models import musp
from musp_jax.models import weights
from musp_jax.training import checkpointing

IN_CHANNELS, H, W, NUM_CLASSES = 60, 8, 6, 11  # 60: divisible by n-1 = 1..5


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
  # Copies: .numpy() shares the tensor's memory, jax on the CPU may keep using it
  # without a copy, and a torch forward in train mode updates BN statistics in place.
  return {k: v.numpy().copy() for k, v in module.state_dict().items()}


def official(n: int) -> dict:
  return dict(value_conv="depthwise", value_channels=IN_CHANNELS,
              pooling="sum", ese="all", attention="softmax",
              global_feature="value_mean", diversity="all")


def paper(n: int) -> dict:
  return dict(value_conv="full", value_channels=IN_CHANNELS // (n - 1),
              pooling="mean", ese="kept", attention="softmax",
              global_feature="backbone_gap", diversity="kept")


class TorchMUSPHead(torch.nn.Module):
  """The MUSP head of docs/design.md section 1, in PyTorch (NCHW)."""

  def __init__(self, in_channels, num_classes, n, *, value_conv,
               value_channels, pooling, ese, attention, global_feature,
               diversity, ese_reduction=16, global_branch=True):
    super().__init__()
    c = value_channels
    self.n, self.pooling, self.ese = n, pooling, ese
    self.global_branch = global_branch
    self.attention, self.global_feature = attention, global_feature
    self.diversity = diversity
    self.key = torch.nn.Conv2d(in_channels, n, 3, padding=1)
    self.value = torch.nn.Conv2d(in_channels, c, 3, padding=1,
                                 groups=c if value_conv == "depthwise" else 1)
    if ese != "none":
      width = (n if ese == "all" else n - 1) * c
      self.c_ = torch.nn.Module()
      self.c_.fc = torch.nn.Sequential(
          torch.nn.Linear(width, width // ese_reduction, bias=False),
          torch.nn.ReLU(),
          torch.nn.Linear(width // ese_reduction, width, bias=False),
          torch.nn.Sigmoid())
    g = c if global_feature == "value_mean" else in_channels
    widths = [c] * (n - 1) + ([g] if global_branch else [])
    self.neck = torch.nn.ModuleList(torch.nn.BatchNorm1d(w) for w in widths)
    self.classifier = torch.nn.ModuleList(
        torch.nn.Linear(w, num_classes, bias=False) for w in widths)

  def _ese(self, parts_bxcxk):
    b, c, k = parts_bxcxk.shape
    flat = parts_bxcxk.reshape(b, c * k)  # channel-major, as the official code
    return (flat * self.c_.fc(flat)).reshape(b, c, k)

  def forward(self, x):
    b, _, h, w = x.shape
    logits = self.key(x).flatten(2)  # b, n, hw
    att = (torch.softmax(logits, dim=1) if self.attention == "softmax"
           else torch.sigmoid(logits))
    value = self.value(x).flatten(2)  # b, c, hw
    if self.pooling == "official":  # the official line, precedence and all
      parts = torch.bmm(value, att.transpose(1, 2)) / h*w
    else:
      parts = torch.bmm(value, att.transpose(1, 2))  # b, c, n
    if self.pooling == "mean":
      parts = parts / (h * w)
    if self.ese == "all":
      parts = self._ese(parts)
    parts = parts[:, :, :-1]
    if self.ese == "kept":
      parts = self._ese(parts)
    areas = F.normalize(att.sum(dim=2)[:, :-1], p=1, dim=1)
    glob = value.mean(dim=2) if self.global_feature == "value_mean" else (
        x.mean(dim=(2, 3)))
    feats = [parts[:, :, k] for k in range(self.n - 1)]
    feats += [glob] if self.global_branch else []
    bn = [neck(f) for neck, f in zip(self.neck, feats)]
    maps = att if self.diversity == "all" else att[:, :-1]
    return {
        "parts": parts.permute(0, 2, 1), "global": glob, "areas": areas,
        "attention": att.reshape(b, self.n, h, w).permute(0, 2, 3, 1),
        "diversity": maps.prod(dim=1).sum(),
        "bn_feats": bn,
        "logits": torch.stack([cls(f) for cls, f in zip(self.classifier, bn)],
                              1),
    }


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Non-trivial BatchNorms (incl. the frozen bias, to check its mapping)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm1d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.3, 0.3)
        m.running_mean.uniform_(-0.3, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  return module


def feature_maps(seed: int, batch: int = 2, h: int = H, w: int = W) -> np.ndarray:
  """Non-negative (post-ReLU-like) backbone maps, NHWC float32."""
  return np.abs(np.random.RandomState(seed).randn(batch, h, w, IN_CHANNELS)).astype(
      np.float32)


def torch_forward(torch_head: torch.nn.Module, maps: np.ndarray) -> dict:
  """The torch head's outputs (as numpy) on NHWC maps."""
  with torch.no_grad():
    return to_numpy(torch_head(torch.from_numpy(maps).permute(0, 3, 1, 2)))


def to_numpy(tree):
  return {k: (v.detach().numpy() if torch.is_tensor(v)
              else [t.detach().numpy() for t in v]) for k, v in tree.items()}


def flax_head(n, variant, **overrides):
  return musp.MUSPHead(num_classes=NUM_CLASSES, num_prototypes=n,
                       **{**variant, **overrides})


def head_pair(n, variant, seed, **overrides):
  """(torch head, Flax head, imported Flax variables)."""
  cfg = {**variant, **overrides}
  torch_head = randomise(TorchMUSPHead(IN_CHANNELS, NUM_CLASSES, n, **cfg),
                         seed).eval()
  head = flax_head(n, variant, **overrides)
  template = jax.eval_shape(lambda: head.init(
      jax.random.key(0), jnp.zeros((1, H, W, IN_CHANNELS))))
  # The whole-model importer, on a model that is all head.
  variables = weights.import_musp(
      numpy_state_dict(torch_head),
      {col: {"head": tree} for col, tree in template.items()})
  return torch_head, head, {col: tree["head"] for col, tree in variables.items()}


# Torch (float32, its own kernels) against the Flax head. The longest sum is the 3x3
# value / attention conv over 60 channels, K = 540: K u = 3.2e-5 relative to the
# largest value (relative_error's measure), hence 1e-4. Measured at most 2.1e-6 on AVX2
# and AVX (test_head_matches_torch and the tests after it).
def compare(out, ref, n, variant_cfg, tol=1e-4):
  c = variant_cfg["value_channels"]
  branches = len(ref["bn_feats"])
  has_global = branches == n
  assert out["feats"].shape[1] == out["logits"].shape[1] == branches
  assert out["areas"].shape[1] == out["bn_feats"].shape[1] == branches
  g = ref["global"].shape[-1]
  feats = np.asarray(out["feats"])
  assert relative_error(feats[:, :n - 1, :c], ref["parts"]) <= tol
  # Narrower branches are zero-padded to the widest.
  assert not np.any(feats[:, :n - 1, c:])
  if has_global:
    assert relative_error(feats[:, n - 1, :g], ref["global"]) <= tol
    assert not np.any(feats[:, n - 1, g:])
    # float32 1 / (n - 1): half an ulp (3e-8) inside the default rtol=1e-7.
    np.testing.assert_allclose(out["areas"][:, n - 1], 1.0 / (n - 1))
  assert relative_error(out["areas"][:, :n - 1], ref["areas"]) <= tol
  assert relative_error(out["attention"], ref["attention"]) <= tol
  assert relative_error(out["diversity"], ref["diversity"]) <= tol
  for k in range(branches):
    width = c if k < n - 1 else g
    assert relative_error(out["bn_feats"][:, k, :width],
                          ref["bn_feats"][k]) <= tol
  assert relative_error(out["logits"], ref["logits"]) <= tol


@pytest.mark.parametrize("n", [2, 3, pytest.param(4, marks=pytest.mark.numerics), 5, 6])
@pytest.mark.parametrize("variant", [official, paper])
def test_head_matches_torch(n, variant):
  torch_head, head, variables = head_pair(n, variant(n), seed=n)
  maps = feature_maps(n)
  ref = torch_forward(torch_head, maps)
  out = jax.jit(head.apply)(variables, maps)
  compare(out, ref, n, variant(n))
  assert out["logits"].shape == (2, n, NUM_CLASSES)
  assert out["attention"].shape == (2, H, W, n)


@pytest.mark.parametrize("overrides", [
    dict(attention="sigmoid"), dict(ese="none"),
    dict(value_conv="depthwise", value_channels=IN_CHANNELS // 2,
         global_feature="backbone_gap")])
def test_head_switches_match_torch(overrides):
  n = 3
  torch_head, head, variables = head_pair(n, official(n), seed=7, **overrides)
  maps = feature_maps(0)
  ref = torch_forward(torch_head, maps)
  compare(jax.jit(head.apply)(variables, maps), ref, n,
          {**official(n), **overrides})


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("overrides", [
    dict(pooling="official"), dict(global_branch=False),
    dict(pooling="official", global_branch=False)])
def test_official_layouts_match_torch(n, overrides):
  """The official `/ h*w` on a non-square map, and `--has-global` off."""
  assert H != W  # sum * W/H, not the sum
  torch_head, head, variables = head_pair(n, official(n), seed=n + 11,
                                          **overrides)
  maps = feature_maps(n)
  ref = torch_forward(torch_head, maps)
  out = jax.jit(head.apply)(variables, maps)
  compare(out, ref, n, official(n))
  branches = n if overrides.get("global_branch", True) else n - 1
  assert out["logits"].shape == (2, branches, NUM_CLASSES)
  assert ("global_branch" in variables["params"]) == (branches == n)
  if branches == n - 1:  # areas: only the kept prototypes', summing to one
    # n - 1 float32 areas normalised to 1: a few ulps; measured 6e-8.
    np.testing.assert_allclose(np.sum(out["areas"], axis=1), 1.0, rtol=1e-6)


def test_official_pooling_is_exactly_sum_on_square_maps():
  n = 4
  _, head, variables = head_pair(n, official(n), seed=5)
  maps = feature_maps(5, h=7, w=7)
  summed = jax.jit(head.apply)(variables, maps)
  official_head = flax_head(n, official(n), pooling="official")
  out = jax.jit(official_head.apply)(variables, maps)
  assert out.keys() == summed.keys()
  for k in out:
    np.testing.assert_array_equal(out[k], summed[k], err_msg=k)


def test_attention_departures_against_the_official_head():
  """The study's options (default off), each from the official head's own outputs:
  temperature T gives softmax(log A / T), normalized pooling divides each part by its
  map's area, and the init scale multiplies the attention conv's initial kernel."""
  n = 4
  _, head, variables = head_pair(n, official(n), seed=6, ese="none")
  maps = feature_maps(6)
  out = jax.jit(head.apply)(variables, maps)
  a = np.asarray(out["attention"], np.float64)
  hot = jax.jit(flax_head(n, official(n), ese="none", attention_temperature=3.0).apply)(
      variables, maps)
  logits = np.log(a) / 3.0
  want = np.exp(logits - logits.max(-1, keepdims=True))
  # Both heads compute the same float32 logits; they differ by the roundings of one
  # softmax, log and exp, a few ulps (u = 6e-8): measured 1.6e-7 relative on AVX2 and AVX.
  np.testing.assert_allclose(hot["attention"], want / want.sum(-1, keepdims=True),
                             rtol=1e-5)
  averaged = jax.jit(flax_head(n, official(n), ese="none", pooling="normalized").apply)(
      variables, maps)
  area = a.sum(axis=(1, 2))[:, :n - 1, None]  # the kept maps' areas, in cells
  # One float32 sum over the H x W cells and a division: (H W + 1) u = 1e-6; measured
  # 1.5e-7 on AVX2 and AVX.
  np.testing.assert_allclose(averaged["feats"][:, :n - 1],
                             np.asarray(out["feats"][:, :n - 1]) / area, rtol=1e-5)
  np.testing.assert_array_equal(averaged["feats"][:, -1], out["feats"][:, -1])  # global
  key, x = jax.random.key(0), jnp.asarray(maps)
  kernel = [flax_head(n, official(n), attention_init_scale=s).init(key, x)["params"]
            ["attention_conv"]["kernel"] for s in (1.0, 0.1)]
  # One float32 product each side (measured 1.2e-7).
  np.testing.assert_allclose(kernel[1], 0.1 * np.asarray(kernel[0]), rtol=1e-5)
  # A 1 x 1 attention conv: each cell's maps are the softmax of its own features times
  # the kernel plus the bias, computed here in float64.
  head_1x1 = flax_head(n, official(n), ese="none", attention_kernel=1)
  params = head_1x1.init(key, x)
  k = np.asarray(params["params"]["attention_conv"]["kernel"], np.float64)
  assert k.shape == (1, 1, IN_CHANNELS, n)
  logits = maps.astype(np.float64) @ k[0, 0] + np.asarray(
      params["params"]["attention_conv"]["bias"], np.float64)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  # float32 logits over K = IN_CHANNELS = 60 products: K u = 3.6e-6 of their magnitude
  # (std 3.5), so the softmax is off by about |logit| K u = 1e-5 relative; measured
  # 2.7e-6 relative, 3.7e-7 absolute on AVX2 and AVX.
  np.testing.assert_allclose(jax.jit(head_1x1.apply)(params, x)["attention"],
                             want / want.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding", ["circular", "zeros"])
def test_circular_padding_makes_the_maps_move_with_the_image(padding):
  """With circular padding the whole model (ResNet-18, layer3 stride 1: output stride
  8, and the head) commutes with a circular shift of the image by a multiple of its
  output stride: the maps shift by whole cells and the features do not change. Zero
  padding gives the cells a border to place themselves by, and breaks that."""
  c = common.get_config().model
  c.depth, c.layer3_stride, c.padding = 18, 1, padding
  model = build_model(c, 10)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  variables = model.init(jax.random.key(1), images)
  forward = jax.jit(model.apply)
  out, shifted = forward(variables, images), forward(variables, jnp.roll(images, (8, 16),
                                                                         axis=(1, 2)))
  moved = np.roll(np.asarray(out["attention"]), (1, 2), axis=(1, 2))
  feats_error = relative_error(shifted["feats"], out["feats"])
  if padding == "circular":
    # Every cell computes the same sums at a shifted place: bit-equal maps on AVX2, AVX
    # and SSE4.2 (measured), and features that add the same 64 cells in another order
    # (measured 1.8e-7). A backend whose convolution rounds by position could differ
    # by the rounding of one logit, sqrt(9 x 512) u |logit| ~ 1e-5, through the
    # softmax: bounded here by 1e-3 and 1e-4, far below the 1.0 and 7e-2 of a border.
    np.testing.assert_allclose(shifted["attention"], moved, rtol=0, atol=1e-3)
    assert feats_error <= 1e-4
  else:  # measured: maps off by up to 1.0, features by 7% (relative)
    assert np.abs(np.asarray(shifted["attention"]) - moved).max() > 0.1
    assert feats_error > 1e-2


@pytest.mark.numerics
def test_train_mode_matches_torch_batch_statistics():
  n = 4
  torch_head, head, variables = head_pair(n, official(n), seed=3)
  maps = feature_maps(3, batch=4)
  torch_head.train()
  ref = torch_forward(torch_head, maps)
  out, updated = jax.jit(lambda v, x: head.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, maps)
  # As compare() (batch statistics add sums of 4 x 48 values); measured 1.9e-6.
  assert relative_error(out["logits"], ref["logits"]) <= 1e-4
  # Running means move as PyTorch's (momentum 0.1); measured 1.5e-7.
  torch_means = np.stack([m.running_mean.numpy() for m in torch_head.neck[:-1]])
  assert relative_error(
      updated["batch_stats"]["part_branches"]["neck"]["bn"]["mean"],
      torch_means) <= 1e-4


@pytest.mark.parametrize("global_branch", [pytest.param(True, marks=pytest.mark.numerics), False])
def test_bnneck_running_statistics_match_torch_after_steps(global_branch):
  """BNNeck running mean/var (unbiased batch variance) follow PyTorch's."""
  n = 4
  torch_head, head, variables = head_pair(n, official(n), seed=9,
                                          global_branch=global_branch)
  torch_head.train()
  step = jax.jit(lambda v, x: head.apply(v, x, train=True,
                                         mutable=["batch_stats"]))
  rng = np.random.RandomState(9)
  for _ in range(3):
    maps = np.abs(rng.randn(6, H, W, IN_CHANNELS)).astype(np.float32)
    _, updated = step(variables, maps)
    variables = {**variables, **updated}
    torch_forward(torch_head, maps)
  stats = variables["batch_stats"]
  necks = [("part_branches", torch_head.neck[:n - 1])]
  if global_branch:
    necks.append(("global_branch", torch_head.neck[n - 1:]))
  for branch, torch_necks in necks:
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      expected = np.stack([getattr(m, theirs).numpy() for m in torch_necks])
      got = stats[branch]["neck"]["bn"][ours].reshape(expected.shape)
      # Three momentum updates of statistics of 6 values: a few float32 roundings
      # (6e-8 each); measured 2.8e-7 on AVX2 and AVX.
      assert relative_error(got, expected) <= 1e-6, (branch, ours)
  assert ("global_branch" in stats) == global_branch


def test_bnneck_bias_gets_no_gradient_and_classifier_has_no_bias():
  n = 3
  _, head, variables = head_pair(n, official(n), seed=1)
  maps = feature_maps(1)

  def loss(params):
    out, _ = head.apply({**variables, "params": params}, maps, train=True,
                        mutable=["batch_stats"])
    return jnp.sum(out["logits"] ** 2) + jnp.sum(out["bn_feats"])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for branch in ("part_branches", "global_branch"):
    assert not np.any(grads[branch]["neck"]["frozen_bias"])
    assert np.any(grads[branch]["neck"]["bn"]["scale"])
    assert set(variables["params"][branch]["classifier"]) == {"kernel"}


@pytest.mark.parametrize("keep_background", [True, False])
def test_diversity_term_against_numpy(keep_background):
  att = np.random.RandomState(0).rand(3, 4, 5, 4).astype(np.float32)
  expected = 0.0
  for b in range(3):
    for i in range(4):
      for j in range(5):
        maps = att[b, i, j] if keep_background else att[b, i, j, :-1]
        expected += float(np.prod(maps))
  got = musp.diversity_term(att, keep_background=keep_background)
  assert got.shape == () and got.dtype == jnp.float32
  # A float32 sum of 60 products of 4 factors: (60 + 4) u = 3.8e-6; measured 1.3e-7.
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.numerics
def test_baseline_head_against_numpy():
  head = musp.BaselineHead(NUM_CLASSES)
  maps = np.random.RandomState(0).randn(3, H, W, IN_CHANNELS).astype(np.float32)
  variables = jax.eval_shape(head.init, jax.random.key(0), maps)
  rng = np.random.RandomState(1)
  variables = jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype), variables)
  out = head.apply(variables, maps)
  p = variables["params"]["global_branch"]
  stats = variables["batch_stats"]["global_branch"]["neck"]["bn"]
  gap = maps.mean(axis=(1, 2))
  bn = ((gap - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
        * p["neck"]["bn"]["scale"] + p["neck"]["frozen_bias"])
  # float32 means over 48 pixels (48 u = 2.9e-6), then the BN (a few roundings), then
  # the classifier's sum over 60 channels (atol 1e-5 for its cancellations). Measured
  # at most 17% of each bound (AVX2 and AVX).
  np.testing.assert_allclose(out["feats"][:, 0], gap, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["bn_feats"][:, 0], bn, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["logits"][:, 0], bn @ p["classifier"]["kernel"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["areas"], np.ones((3, 1)))
  assert float(out["diversity"]) == 0.0
  assert "attention" not in out


def _model_config(**fields):
  config = common.get_config().model
  config.update(dict(depth=18, num_prototypes=3, value_channels=512), **fields)
  return config


@pytest.mark.parametrize("fields,branches,width", [
    (dict(), 3, 512),
    (dict(value_conv="full", value_channels=256, ese="kept", pooling="mean",
          global_feature="backbone_gap", diversity="kept"), 3, 512),
    (dict(dtype="bfloat16"), 3, 512),
    (dict(head="baseline"), 1, 512),
    (dict(global_branch=False), 2, 512),
])
def test_reid_model_output_dict(fields, branches, width):
  model = build_model(_model_config(**fields), num_classes=NUM_CLASSES)
  images = jnp.zeros((2, 64, 64, 3))
  out, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), images))
  expected = {
      "feats": ((2, branches, width), jnp.float32),
      "bn_feats": ((2, branches, width), jnp.float32),
      "logits": ((2, branches, NUM_CLASSES), jnp.float32),
      "areas": ((2, branches), jnp.float32),
      "diversity": ((), jnp.float32),
  }
  if fields.get("head") != "baseline":
    expected["attention"] = ((2, 4, 4, 3), jnp.float32)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "head"}
  assert {x.dtype for x in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}


def test_bad_head_config_is_named():
  with pytest.raises(ValueError, match="model.pooling='max'"):
    build_model(_model_config(pooling="max"), NUM_CLASSES)
  with pytest.raises(ValueError, match="must divide the backbone's 512"):
    model = build_model(_model_config(value_channels=500), NUM_CLASSES)
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    build_model(_model_config(dtype="float16"), NUM_CLASSES)


def _torch_head_only_state_dict(n, **fields):
  """An official head's state dict with a ResNet-18's key names (no values)."""
  with torch.device("meta"):
    keys = torchvision.models.resnet18().state_dict()
  head = TorchMUSPHead(IN_CHANNELS, NUM_CLASSES, n, **{**official(n), **fields})
  return {**{k: None for k in keys}, **numpy_state_dict(head)}


@pytest.mark.parametrize("global_branch", [True, False])
def test_official_layout_is_read_from_the_classifier_count(global_branch):
  n = 4
  state_dict = _torch_head_only_state_dict(n, global_branch=global_branch)
  shapes = weights.musp_checkpoint_shapes(state_dict)
  assert shapes["global_branch"] == global_branch
  assert shapes["num_prototypes"] == n and shapes["pooling"] == "official"

  # A model of the other layout is refused with the field to set.
  head = flax_head(n, official(n), global_branch=not global_branch)
  template = jax.eval_shape(lambda: head.init(
      jax.random.key(0), jnp.zeros((1, H, W, IN_CHANNELS))))
  head_state = {k: v for k, v in state_dict.items() if v is not None}
  with pytest.raises(weights.WeightImportError,
                     match=f"build the model with model.global_branch="
                           f"{global_branch}"):
    weights.import_musp(head_state, {c: {"head": t} for c, t in template.items()})


def test_official_layout_with_a_wrong_classifier_count_is_refused():
  state_dict = _torch_head_only_state_dict(4, global_branch=False)
  del state_dict["classifier.2.weight"]
  with pytest.raises(weights.WeightImportError,
                     match="2 classifiers for 4 prototypes; expected 3 parts"):
    weights.musp_checkpoint_shapes(state_dict)


@pytest.mark.parametrize("global_branch,pooling,size", [
    pytest.param(True, "sum", (64, 64), marks=pytest.mark.numerics),
    # --has-global off, and the official pooling on a non-square map (8x6).
    (False, "official", (64, 48))])
def test_official_checkpoint_through_cli_matches_torch(tmp_path, capsys,
                                                       global_branch, pooling,
                                                       size):
  """A whole official-layout checkpoint (backbone + head) -> ReIDModel."""
  n = 3
  torch.manual_seed(21)
  backbone = torchvision.models.resnet18(weights=None)
  backbone.layer4[0].conv1.stride = (1, 1)  # last stride 1
  backbone.layer4[0].downsample[0].stride = (1, 1)
  for m in backbone.modules():  # non-identity BatchNorms
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.running_var.uniform_(0.5, 2.0)
        m.bias.uniform_(-0.2, 0.2)
  backbone.eval()
  torch_head = randomise(TorchMUSPHead(
      512, NUM_CLASSES, n, value_conv="depthwise", value_channels=512,
      pooling=pooling, ese="all", attention="softmax",
      global_feature="value_mean", diversity="all",
      global_branch=global_branch), 22).eval()
  state = {k: v for k, v in backbone.state_dict().items()
           if not k.startswith("fc.")}
  state.update(torch_head.state_dict())
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()},
              "epoch": 60}, tmp_path / "model.pth.tar")
  import_weights.main(["--musp", str(tmp_path / "model.pth.tar"),
                       "--out", str(tmp_path / "musp")])
  # The settings the importer prints and records build the model.
  printed = capsys.readouterr().err
  assert "--config.model.pooling=official " in printed
  assert f"--config.model.global_branch={global_branch} " in printed
  restored = checkpointing.load_variables(tmp_path / "musp")
  assert restored.step == 0 and restored.run.num_classes == NUM_CLASSES
  recorded = restored.run.config.model.to_dict()
  assert recorded["pooling"] == "official"
  assert recorded["global_branch"] == global_branch

  model = build_model(_model_config(**recorded), NUM_CLASSES)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, *size, 3))))
  fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
  variables = checkpointing.initial_variables(fresh, tmp_path / "musp")
  images = np.random.RandomState(4).randn(2, *size, 3).astype(np.float32)
  out = jax.jit(model.apply)(variables, images)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    maps = torch.nn.Sequential(*list(backbone.children())[:-2])(x)
    ref = to_numpy(torch_head(maps))
  compare(out, ref, n, dict(value_channels=512))
