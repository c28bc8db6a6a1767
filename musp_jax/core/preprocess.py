"""Pixels -> model input on the device: normalisation and random erasing.

Images leave the input workers as uint8 (a quarter of the bytes of float32 through
shared memory and host-to-device copies); the jitted train step, the jitted feature
function and the exported serving function turn them into the model's input here, in
one fused elementwise pass. The random choices (which box to erase) stay on the host
with the rest of the augmentation (augment.py), so a batch is still a pure function of
(seed, step, slot).

docs/design.md section 3: x = (v / 255 - mean) / std per channel; random erasing fills its box
with `erase_fill` after normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZE_CONSTANTS = {
    # The official code normalises with mean = std = 0.5 (values in [-1, 1]).
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalize_constants(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) of input.normalize=`name`, or a ValueError naming the choices."""
  if name not in NORMALIZE_CONSTANTS:
    raise ValueError(f"input.normalize={name!r}; expected one of "
                     f"{sorted(NORMALIZE_CONSTANTS)}.")
  return NORMALIZE_CONSTANTS[name]


def normalize(pixels_BxHxWx3: jax.Array, name: str) -> jax.Array:
  """Pixel values in [0, 255] (uint8, or float after a resize) -> float32 model input.

  Written as (v - 255 mean) / (255 std), subtraction first: v * (1 / (255 std)) -
  mean / std is a multiply-add that XLA fuses, and 255 -> 1 + 1 ulp. This way the
  official mean = std = 0.5 maps 0 -> -1 and 255 -> 1 exactly, as PyTorch's ToTensor
  + Normalize; every value is within 1 ulp of the exact one.
  """
  mean, std = (np.asarray(v, np.float64) for v in normalize_constants(name))
  return ((pixels_BxHxWx3.astype(jnp.float32) - (255.0 * mean).astype(np.float32))
          / (255.0 * std).astype(np.float32))


def erase(images_BxHxWx3: jax.Array, boxes_Bx4: jax.Array,
          fill: Sequence[float]) -> jax.Array:
  """Fills each image's box (top, left, height, width) with `fill`; height 0: none."""
  h, w = images_BxHxWx3.shape[1:3]
  top, left, bh, bw = (boxes_Bx4[:, i, None] for i in range(4))
  rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
  in_rows_BxH = (rows >= top) & (rows < top + bh)
  in_cols_BxW = (cols >= left) & (cols < left + bw)
  inside_BxHxW = in_rows_BxH[:, :, None] & in_cols_BxW[:, None, :]
  return jnp.where(inside_BxHxW[..., None], jnp.asarray(fill, images_BxHxWx3.dtype),
                   images_BxHxWx3)


def train_images(batch: dict[str, jax.Array], input_config: Any) -> jax.Array:
  """A training batch ({"image": uint8, "erase": int32 (B, 4)}) -> model input."""
  image = batch["image"]
  if image.dtype != jnp.uint8 or "erase" not in batch:
    raise ValueError(
        f"A training batch needs 'image' as uint8 and 'erase' boxes (B, 4), as "
        f"input_pipeline.train_batches makes them; got image {image.dtype} and keys "
        f"{sorted(batch)}.")
  return erase(normalize(image, input_config.normalize), batch["erase"],
               input_config.erase_fill)
