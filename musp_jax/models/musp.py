"""The MUSP head, the baseline head and ReIDModel (backbone + head).

MUSP (docs/design.md section 1): n soft attention maps ("prototypes", the last one is
background) pool a value map into n part features; the background part is
dropped, a global feature is added (unless global_branch=False), and every
branch gets a BNNeck and a bias-free classifier. Both variants of the table in
docs/design.md section 1 are switches on MUSPHead; the defaults are the official code's.

Output of both heads and of ReIDModel (P branches: the n-1 parts, then the
global one LAST when there is one; the baseline has only the global one):
    feats      (B, P, C)  pre-BN features, zero-padded to the widest branch
    bn_feats   (B, P, C)  post-BNNeck features, same padding
    logits     (B, P, num_classes) float32
    areas      (B, P)     kept prototypes' L1-normalised areas, then 1/(n-1)
                          for the global branch if there is one
    attention  (B, h, w, n)  (MUSP only)
    diversity  ()         spatial-diversity term (0 for the baseline)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musp_jax.models import fast_conv
from musp_jax.models import resnet

# Linear layers (classifiers, ESE) start from N(0, 0.01) as in the official code.
linear_init = nn.initializers.normal(stddev=0.01)

_CHOICES = {
    "value_conv": ("depthwise", "full"),
    "pooling": ("sum", "official", "mean", "normalized"),
    "ese": ("all", "kept", "none"),
    "attention": ("softmax", "sigmoid"),
    "global_feature": ("value_mean", "backbone_gap"),
    "diversity": ("all", "kept"),
}


def resolve_value_channels(value_channels: int, *, value_conv: str,
                           num_prototypes: int, in_channels: int) -> int:
  """c of the value map; 0 picks each layout's own: the backbone's width for the
  official depthwise conv, width // (n - 1) for the paper text's full conv."""
  if value_channels:
    return value_channels
  return in_channels if value_conv == "depthwise" else in_channels // (num_prototypes - 1)


def diversity_term(attention_BxHxWxN: jax.Array, *,
                   keep_background: bool) -> jax.Array:
  """Sum over batch and pixels of the product of the attention maps.

  Small when the maps do not overlap. keep_background=True multiplies all n
  maps (official code); False only the n-1 kept ones (paper text).
  """
  maps = attention_BxHxWxN if keep_background else attention_BxHxWxN[..., :-1]
  return jnp.sum(jnp.prod(maps.astype(jnp.float32), axis=-1))


class BNNeck(nn.Module):
  """BatchNorm1d whose shift is frozen (bag-of-tricks BNNeck).

  The bias lives in params as `frozen_bias` so that PyTorch weights map onto it
  one to one, but it never receives a gradient: it stays at its initial (or
  imported) value.
  """
  train: bool = False

  @nn.compact
  def __call__(self, feats_BxC: jax.Array) -> jax.Array:
    y = resnet.batch_norm(self.train, jnp.float32, "bn",
                          use_bias=False)(feats_BxC)
    bias = self.param("frozen_bias", nn.initializers.zeros,
                      (feats_BxC.shape[-1],), jnp.float32)
    return y + jax.lax.stop_gradient(bias)


class Branch(nn.Module):
  """One feature branch: BNNeck then a bias-free linear classifier."""
  num_classes: int
  train: bool = False

  @nn.compact
  def __call__(self, feats_BxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    bn_BxC = BNNeck(self.train, name="neck")(feats_BxC.astype(jnp.float32))
    logits_BxK = nn.Dense(self.num_classes, use_bias=False, dtype=jnp.float32,
                          kernel_init=linear_init, name="classifier")(bn_BxC)
    return bn_BxC, logits_BxK


# The parts share Branch's code with stacked parameters (leading axis = part).
PartBranches = nn.vmap(
    Branch, in_axes=1, out_axes=1,
    variable_axes={"params": 0, "batch_stats": 0},
    split_rngs={"params": True})


class ESE(nn.Module):
  """Channel attention over the flattened parts: Linear-ReLU-Linear-sigmoid.

  Parts are flattened channel-major (index = channel * N + part), the layout of
  the official code, so its weights import without a permutation.
  """
  reduction: int = 16

  @nn.compact
  def __call__(self, parts_BxNxC: jax.Array) -> jax.Array:
    b, n, c = parts_BxNxC.shape
    hidden = n * c // self.reduction
    if hidden < 1:
      raise ValueError(f"ESE: {n} parts x {c} channels // ese_reduction "
                       f"{self.reduction} leaves no hidden unit")
    x_BxD = parts_BxNxC.transpose(0, 2, 1).reshape(b, c * n)
    y = nn.relu(nn.Dense(hidden, use_bias=False, kernel_init=linear_init,
                         name="fc1")(x_BxD))
    y = nn.sigmoid(nn.Dense(c * n, use_bias=False, kernel_init=linear_init,
                            name="fc2")(y))
    return (x_BxD * y).reshape(b, c, n).transpose(0, 2, 1)


def _pad_to(x_BxC: jax.Array, width: int) -> jax.Array:
  return jnp.pad(x_BxC, [(0, 0)] * (x_BxC.ndim - 1)
                 + [(0, width - x_BxC.shape[-1])])


class MUSPHead(nn.Module):
  """The MUSP head on a backbone map (B, h, w, D); see the module docstring.

  Attributes (official default / paper text):
    num_prototypes: n, including the background prototype (n >= 2).
    value_conv: "depthwise" (groups = c) / "full".
    value_channels: c (2048 / 2048 // (n - 1)); 0 = that default of the
      value_conv layout for the backbone's width (resolve_value_channels).
    pooling: "sum" over pixels / "mean". "official" is the official line
      `bmm(...) / h*w`, which Python reads as (sum / h) * w: "sum" on square
      maps, sum * w/h otherwise (what the authors' checkpoints see there).
      "normalized" (a departure, for studying the attention): the sum divided
      by the map's area, a weighted average whose scale does not grow with
      the area the map takes.
    ese: "all" n parts before dropping the background / "kept" n-1 parts /
      "none".
    ese_reduction: hidden width = ESE input width // ese_reduction.
    attention: "softmax" over the n maps / "sigmoid" (ablation).
    global_feature: "value_mean" (pixel mean of V) / "backbone_gap" (GAP of M).
    diversity: "all" n maps in the product / "kept" n-1 maps.
    global_branch: adds the global branch (the official `--has-global`);
      without it the outputs hold the n-1 parts only and global_feature is
      unused.
  Departures from both, for studying the attention (README, "Synthetic vehicles";
  default off):
    attention_init_scale: multiplies the standard deviation of the attention
      conv's kaiming initialisation (1 = official). At the official scale the
      initial logits are large and the softmax starts saturated.
    attention_temperature: the attention logits are divided by it before the
      softmax or sigmoid (1 = official).
    attention_kernel: the attention conv's kernel size, 3 (official) or 1: with
      1 each cell's logits come from its own features only, not from its
      neighbours' (nor from the zero padding at the map's border).
    padding: "zeros" (official) or "circular", for the attention and value convs as
      for the backbone (resnet.conv).
  """
  num_classes: int
  num_prototypes: int = 5
  value_conv: str = "depthwise"
  value_channels: int = 0
  pooling: str = "sum"
  ese: str = "all"
  ese_reduction: int = 16
  attention: str = "softmax"
  global_feature: str = "value_mean"
  diversity: str = "all"
  global_branch: bool = True
  attention_init_scale: float = 1.0
  attention_temperature: float = 1.0
  attention_kernel: int = 3
  padding: str = "zeros"
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # for the depthwise value conv: xla | gemm | auto (fast_conv)

  def check_settings(self) -> None:
    """Raises ValueError naming the first bad setting (config.model.*)."""
    for field, choices in _CHOICES.items():
      if getattr(self, field) not in choices:
        raise ValueError(f"model.{field}={getattr(self, field)!r}; expected "
                         f"one of {choices}")
    if self.num_prototypes < 2:
      raise ValueError(f"model.num_prototypes={self.num_prototypes}; need >= 2"
                       " (the last prototype is background)")
    for field in ("attention_init_scale", "attention_temperature"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"model.{field}={value!r}; expected a number > 0")
    if self.attention_kernel not in (1, 3):
      raise ValueError(f"model.attention_kernel={self.attention_kernel!r}; expected 3 "
                       "(official) or 1")

  def _value_channels(self, in_channels: int) -> int:
    self.check_settings()
    c = resolve_value_channels(self.value_channels, value_conv=self.value_conv,
                               num_prototypes=self.num_prototypes,
                               in_channels=in_channels)
    if self.value_conv == "depthwise" and (c < 1 or in_channels % c):
      raise ValueError(
          f"model.value_conv='depthwise' uses groups=value_channels={c}, which "
          f"must divide the backbone's {in_channels} channels")
    if c < 1:
      raise ValueError(f"model.value_channels resolves to {c}; need >= 1")
    return c

  @nn.compact
  def __call__(self, maps_BxHxWxD: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    b, h, w, d = maps_BxHxWxD.shape
    n, c = self.num_prototypes, self._value_channels(d)
    groups = c if self.value_conv == "depthwise" else 1
    att_logits = resnet.conv(n, self.attention_kernel, 1, self.dtype, "attention_conv",
                             use_bias=True,
                             init_scale=self.attention_init_scale,
                             padding=self.padding)(maps_BxHxWxD)
    # The attention conv (D -> n) stays XLA's on every backend: its kernel gradient as
    # matrix products (n = 5 columns) is 3-4x slower on a CPU than XLA's.
    value_BxHxWxC = resnet.conv(c, 3, 1, self.dtype, "value_conv", groups=groups,
                                use_bias=True,
                                impl=fast_conv.resolve_conv_impl(self.conv_impl),
                                padding=self.padding)(maps_BxHxWxD)
    # Pooling and areas in float32: they sum over every pixel.
    att_logits = att_logits.astype(jnp.float32)
    if self.attention_temperature != 1.0:
      att_logits = att_logits / self.attention_temperature
    value_BxHxWxC = value_BxHxWxC.astype(jnp.float32)
    if self.attention == "softmax":
      attention_BxHxWxN = jax.nn.softmax(att_logits, axis=-1)
    else:
      attention_BxHxWxN = jax.nn.sigmoid(att_logits)

    parts_BxNxC = jnp.einsum("bhwn,bhwc->bnc", attention_BxHxWxN, value_BxHxWxC)
    if self.pooling == "mean":
      parts_BxNxC = parts_BxNxC / (h * w)
    elif self.pooling == "official":
      # (sum / h) * w as one factor: exactly 1.0, hence exactly "sum", when h == w.
      parts_BxNxC = parts_BxNxC * (w / h)
    elif self.pooling == "normalized":
      area_BxNx1 = jnp.sum(attention_BxHxWxN, axis=(1, 2))[..., None]
      parts_BxNxC = parts_BxNxC / jnp.maximum(area_BxNx1, 1e-6)
    if self.ese == "all":
      parts_BxNxC = ESE(self.ese_reduction, name="ese")(parts_BxNxC)
    parts_BxKxC = parts_BxNxC[:, :-1]  # drop the background prototype
    if self.ese == "kept":
      parts_BxKxC = ESE(self.ese_reduction, name="ese")(parts_BxKxC)

    kept_areas_BxK = jnp.sum(attention_BxHxWxN[..., :-1], axis=(1, 2))
    kept_areas_BxK = kept_areas_BxK / jnp.maximum(
        jnp.sum(jnp.abs(kept_areas_BxK), axis=-1, keepdims=True), 1e-12)

    bn_parts_BxKxC, logits_parts = PartBranches(
        self.num_classes, train, name="part_branches")(parts_BxKxC)
    feats, bn_feats = [parts_BxKxC], [bn_parts_BxKxC]
    logits, areas = [logits_parts], [kept_areas_BxK]
    if self.global_branch:
      if self.global_feature == "value_mean":
        global_BxG = jnp.mean(value_BxHxWxC, axis=(1, 2))
      else:
        global_BxG = jnp.mean(maps_BxHxWxD.astype(jnp.float32), axis=(1, 2))
      bn_global_BxG, logits_global = Branch(
          self.num_classes, train, name="global_branch")(global_BxG)
      feats.append(global_BxG[:, None])
      bn_feats.append(bn_global_BxG[:, None])
      logits.append(logits_global[:, None])
      areas.append(jnp.full((b, 1), 1.0 / (n - 1), jnp.float32))

    width = max(f.shape[-1] for f in feats)
    return {
        "feats": jnp.concatenate([_pad_to(f, width) for f in feats], 1),
        "bn_feats": jnp.concatenate([_pad_to(f, width) for f in bn_feats], 1),
        "logits": jnp.concatenate(logits, 1),
        "areas": jnp.concatenate(areas, 1),
        "attention": attention_BxHxWxN,
        "diversity": diversity_term(
            attention_BxHxWxN, keep_background=self.diversity == "all"),
    }


class BaselineHead(nn.Module):
  """Bag-of-tricks baseline: global average pooling and one BNNeck branch."""
  num_classes: int

  @nn.compact
  def __call__(self, maps_BxHxWxD: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    b = maps_BxHxWxD.shape[0]
    global_BxD = jnp.mean(maps_BxHxWxD.astype(jnp.float32), axis=(1, 2))
    bn_BxD, logits = Branch(self.num_classes, train,
                            name="global_branch")(global_BxD)
    return {
        "feats": global_BxD[:, None],
        "bn_feats": bn_BxD[:, None],
        "logits": logits[:, None],
        "areas": jnp.ones((b, 1), jnp.float32),
        "diversity": jnp.zeros((), jnp.float32),
    }


class ReIDModel(nn.Module):
  """Backbone (variables under "backbone") + head (under "head")."""
  backbone: resnet.ResNet
  head: nn.Module

  def __call__(self, images_BxHxWx3: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    maps = self.backbone(images_BxHxWx3, train=train)["layer4"]
    return self.head(maps, train=train)
