"""Each augmentation op (uint8 pixels and erase boxes) against hand-computed expectations.

Normalisation and the filling of the erase box run on the device: tests/test_preprocess.py.
"""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from musp_jax.data import augment


def _config(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      image_size=(64, 64), normalize="half", translate_prob=0.0,
      translate_scale=1.125, flip_prob=0.0, erase_prob=0.0,
      erase_area=(0.02, 0.4), erase_min_aspect=0.3,
      erase_fill=(0.4914, 0.4822, 0.4465)))
  c.update(overrides)
  return c


def _png(arr: np.ndarray) -> bytes:
  # Lossless, so pixel values survive encoding exactly.
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _coordinate_image(h: int, w: int) -> np.ndarray:
  """R = 3 * column, G = 3 * row, B = 7: every pixel names its position."""
  rows, cols = np.mgrid[0:h, 0:w]
  return np.stack([3 * cols, 3 * rows, np.full_like(rows, 7)], -1).astype(np.uint8)


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def test_test_transform_is_a_resize():
  img = _smooth_image(50, 70)
  got = augment.TestTransform.from_config(_config())(_png(img))
  assert got.shape == (64, 64, 3) and got.dtype == np.uint8
  # The official transform resizes with PIL's bilinear filter.
  ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))
  diff = np.abs(got.astype(np.float64) - ref)
  assert diff.mean() < 1.0 and diff.max() <= 4.0


@pytest.mark.parametrize("hw", [(300, 400), (90, 300)])
def test_resize_close_to_pil_bilinear_when_shrinking(hw):
  img = _smooth_image(*hw, seed=1)
  got = augment.resize(img, (64, 64)).astype(np.float64)
  ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR))
  assert got.shape == (64, 64, 3)
  assert np.abs(got - ref).mean() < 1.0


def test_decode_grayscale_gives_rgb_and_garbage_fails():
  gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30) % 251
  buf = io.BytesIO()
  Image.fromarray(gray, "L").save(buf, "PNG")
  rgb = augment.decode(buf.getvalue())
  assert rgb.shape == (20, 30, 3)
  np.testing.assert_array_equal(rgb[..., 0], gray)
  np.testing.assert_array_equal(rgb[..., 2], gray)
  with pytest.raises(ValueError, match="image is not a readable image \\(12 bytes"):
    augment.decode(b"not an image")


def test_translate_crop_box_geometry():
  offsets = set()
  for seed in range(300):
    big_h, big_w, top, left = augment.translate_crop_box(
        np.random.default_rng(seed), (64, 48), 1.125)
    assert (big_h, big_w) == (72, 54)  # round(64 * 1.125), round(48 * 1.125)
    assert 0 <= top <= 8 and 0 <= left <= 6
    offsets.add((top, left))
  # Every offset, both extremes included, is reachable.
  assert {t for t, _ in offsets} == set(range(9))
  assert {l for _, l in offsets} == set(range(7))


def test_translation_is_an_exact_crop_of_the_enlarged_image():
  # A source of exactly 1.125 x 64 = 72 px is not resampled, so the output
  # must be a 64x64 window of it; its corner pixel tells where.
  src = _coordinate_image(72, 72)
  transform = augment.TrainTransform.from_config(_config(translate_prob=1.0))
  seen = set()
  for seed in range(40):
    out, box = transform(_png(src), np.random.default_rng(seed))
    assert out.dtype == np.uint8 and tuple(box) == augment.NO_ERASE
    left, top = int(out[0, 0, 0]) // 3, int(out[0, 0, 1]) // 3
    assert 0 <= top <= 8 and 0 <= left <= 8
    np.testing.assert_array_equal(out, src[top:top + 64, left:left + 64])
    seen.add((top, left))
  assert len(seen) > 5  # the window moves


def test_no_translation_is_a_plain_resize():
  img = _smooth_image(50, 70)
  cfg = _config(translate_prob=0.0)
  train, _ = augment.TrainTransform.from_config(cfg)(
      _png(img), np.random.default_rng(0))
  test = augment.TestTransform.from_config(cfg)(_png(img))
  np.testing.assert_array_equal(train, test)


def test_flip_mirrors_columns():
  src = _coordinate_image(64, 64)
  flipped, _ = augment.TrainTransform.from_config(_config(flip_prob=1.0))(
      _png(src), np.random.default_rng(0))
  np.testing.assert_array_equal(flipped, src[:, ::-1])
  kept, _ = augment.TrainTransform.from_config(_config(flip_prob=0.0))(
      _png(src), np.random.default_rng(0))
  np.testing.assert_array_equal(kept, src)


def test_flip_probability():
  src = _coordinate_image(64, 64)
  transform = augment.TrainTransform.from_config(_config(flip_prob=0.5))
  flips = sum(
      transform(_png(src), np.random.default_rng(s))[0][0, 0, 0] > 0  # col 63
      for s in range(200))
  assert 70 <= flips <= 130  # Binomial(200, 0.5): 6 sigma


def test_erasing_area_aspect_and_position():
  img = np.full((64, 64, 3), 100, np.uint8)
  transform = augment.TrainTransform.from_config(_config(erase_prob=1.0))
  areas = []
  for seed in range(200):
    pixels, box = transform(_png(img), np.random.default_rng(seed))
    # The pixels are untouched: the box is filled on the device, after normalising.
    np.testing.assert_array_equal(pixels, img)
    assert box.dtype == np.int32 and box.shape == (4,)
    top, left, h, w = (int(v) for v in box)
    assert 0 < h < 64 and 0 < w < 64
    assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
    # h = round(sqrt(A r)), w = round(sqrt(A / r)), A in [0.02, 0.4] * 64^2,
    # r in [0.3, 1/0.3]: rounding moves each side by at most 1/2.
    assert 0.02 * 64 * 64 - (h + w) / 2 - 0.25 <= h * w
    assert h * w <= 0.4 * 64 * 64 + (h + w) / 2 + 0.25
    assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
    areas.append(h * w / (64 * 64))
  assert min(areas) < 0.08 and max(areas) > 0.3  # the range is explored


def test_erasing_probability_and_off():
  img = np.full((32, 32, 3), 50, np.uint8)
  half = augment.TrainTransform.from_config(_config(image_size=(32, 32), erase_prob=0.5))
  erased = sum(tuple(half(_png(img), np.random.default_rng(s))[1]) != augment.NO_ERASE
               for s in range(200))
  assert 70 <= erased <= 130
  off = augment.TrainTransform.from_config(_config(image_size=(32, 32), erase_prob=0.0))
  for s in range(20):
    assert tuple(off(_png(img), np.random.default_rng(s))[1]) == augment.NO_ERASE


def test_erase_box_gives_up_when_nothing_fits():
  # Area >= 99% of a 4x4 image with square boxes: h = w = 4, never < 4.
  rng = np.random.default_rng(0)
  assert augment.erase_box(rng, 4, 4, area=(0.99, 1.0), min_aspect=1.0) is None


def test_erase_box_corner_covers_all_positions():
  # 10x10 image, area fixed at 0.25 and square: always a 5x5 box, with the
  # corner uniform over 0..5 (both ends included).
  corners = set()
  for seed in range(400):
    top, left, h, w = augment.erase_box(
        np.random.default_rng(seed), 10, 10, area=(0.25, 0.25), min_aspect=1.0)
    assert (h, w) == (5, 5)
    corners.add((top, left))
  assert corners == {(t, l) for t in range(6) for l in range(6)}


def test_same_rng_same_output():
  img = _smooth_image(80, 120)
  transform = augment.TrainTransform.from_config(_config(
      translate_prob=0.5, flip_prob=0.5, erase_prob=0.5))
  a = transform(_png(img), np.random.default_rng([1, 2, 3]))
  b = transform(_png(img), np.random.default_rng([1, 2, 3]))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
  c = transform(_png(img), np.random.default_rng([1, 2, 4]))
  assert not np.array_equal(a[0], c[0])


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="erase_area"):
    augment.TrainTransform.from_config(_config(erase_area=(0.5, 0.2)))
  with pytest.raises(ValueError, match="erase_min_aspect"):
    augment.TrainTransform.from_config(_config(erase_min_aspect=0.0))
  with pytest.raises(ValueError, match="translate_scale"):
    augment.TrainTransform.from_config(_config(translate_scale=0.9))
