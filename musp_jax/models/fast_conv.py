"""Convolutions written as matrix products, for XLA's CPU backend.

XLA's CPU backend runs the forward convolution of a ResNet well enough, but the
kernel gradient of a convolution (a convolution whose "batch" is the channel
axis) falls off its fast path: for a 1x1 convolution it is ~20-40x slower than
the single matrix product it really is. A ResNet-50 train step spends most of
its time there. This module computes

  * 1x1 convolutions (half of ResNet-50's FLOPs) as one `dot_general` over the
    flattened NHWC tensor, so forward and both gradients are matrix products;
  * k x k convolutions with XLA's convolution forward and input gradient, and
    the kernel gradient as k*k matrix products over shifted views of the input
    (dW[i, j] = sum over pixels of x[shifted by (i, j)]^T dy); where the output
    map has at most FEW_OUTPUT_PIXELS pixels, where XLA's forward is slow too,
    the whole convolution as k*k matrix products over those views;
  * depthwise convolutions (one group per channel: the official MUSP head's value
    conv) as k*k multiply-adds of shifted views, which XLA fuses into one loop
    forward and backward; its grouped convolution takes ~20x longer on a CPU
    (5.5 s against 0.26 s for the 16 x 16 x 2048 value map of a batch of 16).

`GemmConv` is a drop-in for `flax.linen.Conv` (same "kernel" HWIO / "bias"
parameters), so weight import and checkpoints are unaffected. On GPU keep
cuDNN ("xla"): `resolve_conv_impl("auto")` picks per backend.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]
CONV_IMPLS = ("xla", "gemm", "auto")


def resolve_conv_impl(name: str) -> str:
  """Maps config.model.conv_impl to "xla" or "gemm" ("auto": gemm on CPU only)."""
  if name not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={name!r}; expected one of {CONV_IMPLS}")
  if name == "auto":
    return "gemm" if jax.default_backend() == "cpu" else "xla"
  return name


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: Padding) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS)


def _shifted_views(x: jax.Array, kh: int, kw: int, strides: tuple[int, int],
                   padding: Padding, out_hw: tuple[int, int]):
  """Yields (i, j, x zero-padded and sampled at the pixels tap (i, j) of the kernel
  reads)."""
  x_pad = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  (sh, sw), (oh, ow) = strides, out_hw
  for i in range(kh):
    for j in range(kw):
      yield i, j, x_pad[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]


def _kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                 strides: tuple[int, int], padding: Padding) -> jax.Array:
  """dL/dkernel as kh*kw matrix products contracting batch and pixels."""
  kh, kw, _, _ = kernel_shape
  taps = {}
  for i, j, view in _shifted_views(x, kh, kw, strides, padding, dy.shape[1:3]):
    # Accumulate the long (batch x pixels) sum in float32 whatever the dtype.
    taps[i, j] = lax.dot_general(view, dy, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                 preferred_element_type=jnp.float32)
  rows = [jnp.stack([taps[i, j] for j in range(kw)]) for i in range(kh)]
  return jnp.stack(rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm_kernel_grad(x: jax.Array, kernel: jax.Array,
                           strides: tuple[int, int], padding: Padding) -> jax.Array:
  return _xla_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # The input gradient stays XLA's (a regular convolution with the flipped
  # kernel, which is on XLA's fast path).
  _, x_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, padding), x)
  (dx,) = x_vjp(dy)
  dkernel = _kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dkernel.astype(kernel.dtype)


_conv_gemm_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


# XLA's CPU convolution also leaves its fast path when the output map has only a few
# pixels: a 3x3 conv, 512 -> 512 channels, batch 48, takes 565 ms forward and 1.2 s with
# both gradients for a 2 x 2 output, against 25 ms forward for the four times larger
# 4 x 4 one (the last stage of a ResNet at 32-64 px; scripts/bench_train.py
# --image_size 32). Up to this many output pixels a k x k convolution is summed as k*k
# matrix products of shifted views, and autodiff makes both gradients matrix products.
FEW_OUTPUT_PIXELS = 4


def _output_hw(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
               padding: Padding) -> tuple[int, int]:
  return tuple((x.shape[1 + a] + sum(padding[a]) - kernel_hw[a]) // strides[a] + 1
               for a in (0, 1))


def _conv_as_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  padding: Padding, out_hw: tuple[int, int]) -> jax.Array:
  """sum over taps (i, j) of x shifted by (i, j) times kernel[i, j]; float32 sums."""
  kh, kw = kernel.shape[:2]
  y = sum(lax.dot_general(view, kernel[i, j], (((3,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
          for i, j, view in _shifted_views(x, kh, kw, strides, padding, out_hw))
  return y.astype(jnp.result_type(x, kernel))


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: Padding) -> jax.Array:
  """NHWC x HWIO convolution, equal to `lax.conv_general_dilated`, CPU-friendly."""
  kh, kw = kernel.shape[:2]
  if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
    sh, sw = strides
    if (sh, sw) != (1, 1):
      # A strided 1x1 convolution reads every sh-th row and sw-th column.
      x = x[:, ::sh, ::sw, :]
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  out_hw = _output_hw(x, (kh, kw), strides, padding)
  if math.prod(out_hw) <= FEW_OUTPUT_PIXELS:
    return _conv_as_taps(x, kernel, strides, padding, out_hw)
  return _conv_gemm_kernel_grad(x, kernel, strides, padding)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                     padding: Padding) -> jax.Array:
  """NHWC x (kh, kw, 1, C) depthwise convolution as shifted multiply-adds.

  Equal to `lax.conv_general_dilated(..., feature_group_count=C)`; products are
  summed in float32 whatever the dtype, as a convolution accumulates.
  """
  kh, kw = kernel.shape[:2]
  out_hw = _output_hw(x, (kh, kw), strides, padding)
  taps = kernel[:, :, 0, :].astype(jnp.float32)
  y = sum(view.astype(jnp.float32) * taps[i, j]
          for i, j, view in _shifted_views(x, kh, kw, strides, padding, out_hw))
  return y.astype(x.dtype)


def _normalise_padding(padding: Any, kernel_size: tuple[int, int]) -> Padding:
  if isinstance(padding, str):
    if padding.upper() != "VALID":
      raise ValueError(
          f"GemmConv padding={padding!r}: only 'VALID' or explicit (lo, hi) pairs are "
          "supported ('SAME' differs from PyTorch on even inputs).")
    return ((0, 0), (0, 0))
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pairs) != len(kernel_size):
    raise ValueError(f"GemmConv padding={padding!r} must give one (lo, hi) pair per "
                     f"spatial dimension of kernel_size={kernel_size}.")
  return pairs


class GemmConv(nn.Module):
  """A 2-D NHWC convolution with `nn.Conv`'s parameters, computed as GEMMs.

  Supports what a ResNet and the MUSP head need: explicit padding, strides, no
  dilation, one group or one group per channel (depthwise); other grouped
  convolutions fall back to XLA's convolution.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | int = 1
  padding: Any = "VALID"
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_size = tuple(self.kernel_size)
    if len(kernel_size) != 2 or x.ndim != 4:
      raise ValueError(f"GemmConv is 2-D NHWC: kernel_size={kernel_size}, "
                       f"input shape {x.shape}.")
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = _normalise_padding(self.padding, kernel_size)
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f"GemmConv: {in_features} input channels are not divisible by "
                       f"feature_group_count={self.feature_group_count}.")
    kernel = self.param(
        "kernel", self.kernel_init,
        (*kernel_size, in_features // self.feature_group_count, self.features),
        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.feature_group_count == 1:
      y = conv2d(x, kernel, strides, padding)
    elif self.feature_group_count == in_features == self.features:
      y = depthwise_conv2d(x, kernel, strides, padding)
    else:
      y = lax.conv_general_dilated(x, kernel, strides, padding,
                                   dimension_numbers=_DIMENSION_NUMBERS,
                                   feature_group_count=self.feature_group_count)
    if bias is not None:
      y = y + bias
    return y
