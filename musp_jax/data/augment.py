"""Image transforms run by the grain workers (numpy + OpenCV only, no JAX).

Train (docs/design.md section 3, the official code's order): random 2D translation
(with probability p resize to 1.125x and take a random crop, else resize),
horizontal flip, and the box of random erasing. Test: resize. Both hand over
uint8 pixels: normalisation and the erasing itself (after normalisation, as the
official code) run on the device in the jitted step (musp_jax/core/preprocess.py).

OpenCV rather than PIL: its decoder and SIMD resize are about twice as fast,
which is what lets a CPU core keep up with a GPU (scripts/bench_input.py).
Bilinear interpolation matches the official PIL transforms when enlarging
and stays within about half a grey level of them for VeRi's 100-500 px
images; shrinking by 2x or more uses area averaging, which like PIL's
bilinear filter does not alias.

Every random choice comes from a `np.random.Generator` the caller seeds per
record, so an image's augmentation does not depend on worker count or order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np

ERASE_ATTEMPTS = 100  # as the reference RandomErasing
# Separate random streams from the one run seed (the PK sampler uses 0).
_AUGMENT_STREAM = 1


def train_rng(seed: int, step: int, slot: int) -> np.random.Generator:
  """The generator of the training image at `slot` of the global batch at `step`.

  Seeded by position in the global batch: independent of workers and processes.
  """
  return np.random.default_rng([seed, _AUGMENT_STREAM, step, slot])


def decode(data: bytes, *, where: str = "image") -> np.ndarray:
  """Decodes encoded image bytes to an RGB uint8 array (H, W, 3), or a ValueError
  naming `where` (the file or record the bytes come from)."""
  try:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    reason = ""
  except Exception as e:  # cv2 raises several types on garbage input
    img, reason = None, f": {e}"
  if img is None:
    raise ValueError(f"{where} is not a readable image ({len(data)} bytes; expected JPEG, "
                     f"PNG, BMP, WebP or TIFF){reason}")
  return img


def resize(img_HxWx3: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Resizes to `size_hw` (height, width): bilinear; area when >= 2x smaller.

  Below a factor of 2 bilinear stays as close to PIL's filter as area
  averaging (mean difference about half a grey level) at a third of the cost.
  """
  h, w = size_hw
  if img_HxWx3.shape[:2] == (h, w):
    return img_HxWx3
  shrink = img_HxWx3.shape[0] >= 2 * h and img_HxWx3.shape[1] >= 2 * w
  interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(img_HxWx3, (w, h), interpolation=interpolation)


def translate_crop_box(
    rng: np.random.Generator, size_hw: tuple[int, int], scale: float
) -> tuple[int, int, int, int]:
  """Samples the crop of the random 2D translation.

  Returns (resized_h, resized_w, top, left): the image is resized to
  (resized_h, resized_w) = round(scale * size) and cropped to `size_hw` at
  (top, left), each offset round(uniform(0, max_offset)) as the official code.
  """
  h, w = size_hw
  big_h, big_w = int(round(h * scale)), int(round(w * scale))
  left = int(round(rng.uniform(0, big_w - w)))
  top = int(round(rng.uniform(0, big_h - h)))
  return big_h, big_w, top, left


def erase_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    area: tuple[float, float],
    min_aspect: float,
) -> tuple[int, int, int, int] | None:
  """Samples a random-erasing rectangle (top, left, h, w), or None.

  Reference semantics (Zhong et al., as in the official code): up to 100
  attempts; target area uniform in `area` x image area, aspect ratio uniform in
  [min_aspect, 1 / min_aspect], h = round(sqrt(area * aspect)),
  w = round(sqrt(area / aspect)); accepted when h < height and w < width; the
  corner is uniform over all positions that keep the box inside the image.
  """
  for _ in range(ERASE_ATTEMPTS):
    target_area = rng.uniform(area[0], area[1]) * height * width
    aspect = rng.uniform(min_aspect, 1.0 / min_aspect)
    h = int(round(math.sqrt(target_area * aspect)))
    w = int(round(math.sqrt(target_area / aspect)))
    if h < height and w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return None


NO_ERASE = (0, 0, 0, 0)  # an erase box of height 0: nothing is erased


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Decode + docs/design.md section 3 train augmentation; call with (bytes, rng)."""

  size_hw: tuple[int, int]
  translate_prob: float
  translate_scale: float
  flip_prob: float
  erase_prob: float
  erase_area: tuple[float, float]
  erase_min_aspect: float

  @classmethod
  def from_config(cls, input_config: Any) -> TrainTransform:
    c = input_config
    lo, hi = c.erase_area
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"input.erase_area={c.erase_area}; need 0 <= lo <= hi <= 1.")
    if not 0.0 < c.erase_min_aspect <= 1.0:
      raise ValueError(
          f"input.erase_min_aspect={c.erase_min_aspect}; need 0 < value <= 1."
      )
    if c.translate_scale < 1.0:
      raise ValueError(f"input.translate_scale={c.translate_scale}; need >= 1.")
    return cls(
        size_hw=tuple(c.image_size),
        translate_prob=float(c.translate_prob),
        translate_scale=float(c.translate_scale),
        flip_prob=float(c.flip_prob),
        erase_prob=float(c.erase_prob),
        erase_area=(float(lo), float(hi)),
        erase_min_aspect=float(c.erase_min_aspect),
    )

  def __call__(
      self, data: bytes, rng: np.random.Generator
  ) -> tuple[np.ndarray, np.ndarray]:
    """Decode, translate and flip: uint8 (H, W, 3), and the erase box.

    The box is int32 (top, left, height, width), NO_ERASE when the image is
    not erased; preprocess.erase fills it on the device.
    """
    img = decode(data)
    # Always draw the translation, flip and erase decisions, so one op's
    # outcome never shifts the random stream seen by the next.
    do_translate = rng.random() < self.translate_prob
    big_h, big_w, top, left = translate_crop_box(
        rng, self.size_hw, self.translate_scale
    )
    do_flip = rng.random() < self.flip_prob
    do_erase = rng.random() < self.erase_prob
    h, w = self.size_hw
    if do_translate:
      img = resize(img, (big_h, big_w))[top : top + h, left : left + w]
    else:
      img = resize(img, self.size_hw)
    if do_flip:
      img = cv2.flip(img, 1)
    box = None
    if do_erase:
      box = erase_box(
          rng, h, w, area=self.erase_area, min_aspect=self.erase_min_aspect
      )
    return np.ascontiguousarray(img), np.asarray(box or NO_ERASE, np.int32)


@dataclasses.dataclass(frozen=True)
class TestTransform:
  """Decode and resize (docs/design.md section 3 test transform, before normalisation)."""

  size_hw: tuple[int, int]

  @classmethod
  def from_config(cls, input_config: Any) -> TestTransform:
    return cls(size_hw=tuple(input_config.image_size))

  def __call__(self, data: bytes) -> np.ndarray:
    """Decoded and resized uint8 (H, W, 3)."""
    return resize(decode(data), self.size_hw)
