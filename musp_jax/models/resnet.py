"""ResNet-18/34/50/101/152 in Flax linen with torchvision's exact layout, and
ResNet-IBN-a (docs/design.md section 1).

Every module name and padding mirrors torchvision's `resnet{depth}` so that its
`state_dict` maps onto these variables one to one (see models/weights.py):

    torchvision                 Flax (params / batch_stats)
    conv1.weight                conv1/kernel              OIHW -> HWIO
    bn1.{weight,bias}           bn1/{scale,bias}
    bn1.running_{mean,var}      bn1/{mean,var}
    layer2.0.conv2.weight       layer2_0/conv2/kernel
    layer2.0.downsample.{0,1}   layer2_0/downsample_conv, layer2_0/downsample_bn
    fc.{weight,bias}            fc/{kernel,bias}          (only with num_classes)

ResNet v1.5: in a bottleneck the stride sits on the 3x3 conv. Padding is
explicit because 'SAME' pads (0, 1) on even inputs where PyTorch pads (1, 1).

ResNet-IBN-a (`backbone="resnet_ibn_a"`, the layout of the IBN-Net release and of
fast-reid) differs in one place: the first normalisation (bn1) of every block of
layers 1-3 is `InstanceBatchNorm`, whose two halves keep IBN-Net's names:

    layer1.0.bn1.IN.{weight,bias}          layer1_0/bn1/IN/{scale,bias}
    layer1.0.bn1.BN.running_{mean,var}     layer1_0/bn1/BN/{mean,var}
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from musp_jax.models import fast_conv

# torchvision's ResNet zoo: block type and number of blocks per stage.
STAGE_SIZES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_WIDTHS = (64, 128, 256, 512)
# The backbone architectures (config.model.backbone): torchvision's ResNet, and
# ResNet-IBN-a, instance normalisation in half of the first norm of layers 1-3.
BACKBONES = ("resnet", "resnet_ibn_a")
_EXPANSION = {"basic": 1, "bottleneck": 4}


def output_channels(depth: int) -> int:
  """Channels of the last stage's map: 512 (ResNet-18/34) or 2048 (50/101/152)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth {depth} is not one of {sorted(STAGE_SIZES)}")
  return _WIDTHS[-1] * _EXPANSION[STAGE_SIZES[depth][0]]


def output_stride(last_stride: int, layer3_stride: int = 2) -> int:
  """Input pixels per pixel of the last stage's map: the stem (conv and max-pool)
  reduces 4x, stage 2 2x, stage 3 `layer3_stride`x, the last stage `last_stride`x."""
  return 4 * 2 * layer3_stride * last_stride


# torchvision initialises convs with kaiming_normal_(mode="fan_out"), a plain
# (untruncated) normal.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


PADDINGS = ("zeros", "circular")


def conv(features: int, kernel_size: int, strides: int, dtype: Any,
         name: str, *, groups: int = 1, use_bias: bool = False,
         impl: str = "xla", init_scale: float = 1.0, padding: str = "zeros"):
  """A PyTorch-padded conv: symmetric `kernel_size // 2` on each side.

  impl: "xla" (nn.Conv) or "gemm" (fast_conv.GemmConv, same parameters).
  init_scale multiplies the standard deviation of the kaiming initialisation.
  padding: "zeros" (torchvision) or "circular" (the map wraps around: no border, so
  no cell can tell where in the frame it lies; same parameters).
  """
  if padding not in PADDINGS:
    raise ValueError(f"model.padding={padding!r}; expected one of {PADDINGS}")
  p = kernel_size // 2
  conv_cls = fast_conv.GemmConv if impl == "gemm" else nn.Conv
  kernel_init = conv_kernel_init if init_scale == 1.0 else nn.initializers.variance_scaling(
      2.0 * init_scale**2, "fan_out", "normal")
  explicit = padding == "zeros"
  module = conv_cls(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=((p, p), (p, p)) if explicit else ((0, 0), (0, 0)),
      feature_group_count=groups, use_bias=use_bias,
      dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
      name=name)
  if explicit:
    return module
  return lambda x: module(wrap(x, p))


def wrap(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """Circular padding of p cells on each side of both spatial axes."""
  if p == 0:
    return x_BxHxWxC
  return jnp.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)), mode="wrap")


class TorchBatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose running variance moves as PyTorch's does.

  Both normalise with the biased batch variance v. PyTorch then moves its
  running variance towards the unbiased v * n / (n - 1), n = values per
  channel (batch x pixels); Flax towards v. Flax has just stored
  new = m * old + (1 - m) * v, so the missing (1 - m) * v / (n - 1) is
  (new - m * old) / (n - 1), added here. Variables (params scale/bias,
  batch_stats mean/var) are nn.BatchNorm's: weight import and checkpoints are
  unaffected.

  n is the input's size over the reduced axes. Under jit with a sharded global
  batch the array is global, so n is the global count; a per-device count
  under `axis_name` (pmap, shard_map) would be wrong, hence refused.
  """

  def __call__(self, x: jax.Array,
               use_running_average: bool | None = None) -> jax.Array:
    updating = not nn.merge_param(
        "use_running_average", self.use_running_average,
        use_running_average) and not self.is_initializing()
    if updating:
      if self.axis_name is not None:
        raise ValueError("TorchBatchNorm counts the values per channel from "
                         "the input's shape; it does not support axis_name")
      axes = (self.axis,) if isinstance(self.axis, int) else self.axis
      n = x.size // math.prod(x.shape[a] for a in axes)
      if n < 2:  # as PyTorch: an unbiased variance needs two values
        raise ValueError(f"BatchNorm {self.name!r} in training mode needs more "
                         f"than one value per channel; input shape {x.shape}")
      old_var = self.get_variable("batch_stats", "var")
    y = super().__call__(x, use_running_average)
    if updating:
      new_var = self.get_variable("batch_stats", "var")
      self.put_variable("batch_stats", "var",
                        new_var + (new_var - self.momentum * old_var) / (n - 1))
    return y


def batch_norm(train: bool, dtype: Any, name: str, *,
               use_bias: bool = True) -> TorchBatchNorm:
  """PyTorch-equivalent BatchNorm: eps 1e-5, torch momentum 0.1, unbiased
  running variance (TorchBatchNorm).

  Statistics stay float32 whatever the compute dtype. No `axis_name`: under jit
  with a sharded global batch the statistics are already global.
  """
  return TorchBatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
      param_dtype=jnp.float32, use_bias=use_bias, use_fast_variance=False,
      force_float32_reductions=True, name=name)


class InstanceBatchNorm(nn.Module):
  """IBN-a's first normalisation of a block: the first int(0.5 * channels) channels
  instance-normalised, the others batch-normalised (TorchBatchNorm).

  The instance half is PyTorch's InstanceNorm2d(affine=True) as IBN-Net and
  fast-reid build it: eps 1e-5, biased variance over each image's pixels, and no
  running statistics, so training and evaluation normalise alike.
  """
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    half = int(x.shape[-1] * 0.5)
    instance = nn.InstanceNorm(
        epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
        use_fast_variance=False, force_float32_reductions=True, name="IN")(x[..., :half])
    batch = batch_norm(self.train, self.dtype, "BN")(x[..., half:])
    return jnp.concatenate([instance, batch], axis=-1)


class Block(nn.Module):
  """A torchvision BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1); with `ibn`,
  its first norm is InstanceBatchNorm (ResNet-IBN-a, layers 1-3)."""
  kind: str  # basic | bottleneck
  planes: int
  strides: int = 1
  downsample: bool = False
  train: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "xla"  # xla | gemm (see fast_conv)
  ibn: bool = False
  padding: str = "zeros"  # zeros | circular (see conv)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "basic":
      convs = [(self.planes, 3, self.strides), (self.planes, 3, 1)]
    else:  # v1.5: the stride is on the 3x3 conv.
      convs = [(self.planes, 1, 1), (self.planes, 3, self.strides),
               (self.planes * 4, 1, 1)]
    y = x
    for i, (features, k, s) in enumerate(convs, start=1):
      y = conv(features, k, s, self.dtype, f"conv{i}", impl=self.conv_impl,
               padding=self.padding)(y)
      if i == 1 and self.ibn:
        y = InstanceBatchNorm(self.train, self.dtype, name="bn1")(y)
      else:
        y = batch_norm(self.train, self.dtype, f"bn{i}")(y)
      if i < len(convs):
        y = nn.relu(y)
    if self.downsample:
      x = conv(convs[-1][0], 1, self.strides, self.dtype, "downsample_conv",
               impl=self.conv_impl)(x)
      x = batch_norm(self.train, self.dtype, "downsample_bn")(x)
    return nn.relu(y + x)


def _torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
  """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for W and b."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ResNet(nn.Module):
  """torchvision ResNet; returns named intermediates.

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    last_stride: stride of the last stage (1 for re-ID: 256x256 -> 16x16).
    layer3_stride: stride of the third stage (2 as torchvision; 1 halves the output
      stride again, 64x64 -> 8x8 maps, with the same parameters).
    num_classes: adds torchvision's `fc` classifier when set (ImageNet: 1000).
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    conv_impl: "xla", "gemm" or "auto" (gemm on CPU, xla elsewhere); see
      fast_conv. Same parameters either way.
    backbone: "resnet" (torchvision) or "resnet_ibn_a" (IBN-a in layers 1-3).
    padding: "zeros" (torchvision) or "circular": convolutions and the stem's max
      pool wrap around the frame, so the network has no border from which to learn
      where a cell lies (a departure for studying the attention; same parameters).
  """
  depth: int = 50
  last_stride: int = 1
  layer3_stride: int = 2
  num_classes: int | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "xla"
  backbone: str = "resnet"
  padding: str = "zeros"

  @nn.compact
  def __call__(self, images_BxHxWx3: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    """Returns {"stem", "layer1".."layer4", "pooled"[, "logits"]}."""
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet depth {self.depth} is not one of "
                       f"{sorted(STAGE_SIZES)}")
    for name in ("last_stride", "layer3_stride"):
      if getattr(self, name) not in (1, 2):
        raise ValueError(f"{name} must be 1 or 2, got {getattr(self, name)}")
    if self.backbone not in BACKBONES:
      raise ValueError(f"model.backbone={self.backbone!r}; expected one of {BACKBONES}")
    kind, sizes = STAGE_SIZES[self.depth]
    impl = fast_conv.resolve_conv_impl(self.conv_impl)
    out = {}
    x = images_BxHxWx3.astype(self.dtype)
    x = conv(64, 7, 2, self.dtype, "conv1", impl=impl, padding=self.padding)(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    if self.padding == "circular":
      x = nn.max_pool(wrap(x, 1), (3, 3), strides=(2, 2))
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out["stem"] = x
    in_features = 64
    for stage, (planes, num_blocks) in enumerate(zip(_WIDTHS, sizes), start=1):
      stage_stride = {1: 1, 3: self.layer3_stride, 4: self.last_stride}.get(stage, 2)
      for b in range(num_blocks):
        strides = stage_stride if b == 0 else 1
        out_features = planes * _EXPANSION[kind]
        x = Block(kind, planes, strides,
                  downsample=strides != 1 or in_features != out_features,
                  train=train, dtype=self.dtype, conv_impl=impl,
                  ibn=self.backbone == "resnet_ibn_a" and stage < 4,
                  padding=self.padding,
                  name=f"layer{stage}_{b}")(x)
        in_features = out_features
      out[f"layer{stage}"] = x
    # Average in float32: a bf16 sum over 256 pixels loses precision.
    out["pooled"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is not None:
      out["logits"] = nn.Dense(
          self.num_classes, dtype=jnp.float32,
          kernel_init=_torch_linear_init(in_features),
          bias_init=_torch_linear_init(in_features), name="fc")(out["pooled"])
    return out
