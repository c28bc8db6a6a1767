"""Each augmentation op against hand-computed expectations."""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from musp_jax import augment


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


def _half(arr: np.ndarray) -> np.ndarray:
  return arr.astype(np.float64) / 127.5 - 1.0


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("name,mean,std", [
    ("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    (None, (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)),  # uniform, not 0.5
])
def test_normalize_constants(name, mean, std):
  values = np.array([[[0, 128, 255], [255, 0, 64]]], np.uint8)  # 1x2x3
  normalize = (augment.Normalize.from_name(name) if name
               else augment.Normalize(mean, std))
  got = normalize(values)
  assert got.dtype == np.float32 and got.shape == (1, 2, 3)
  for c in range(3):
    for x in range(2):
      want = (values[0, x, c] / 255.0 - mean[c]) / std[c]
      assert got[0, x, c] == pytest.approx(want, abs=1e-6)
  if name == "half":  # 0 -> -1 and 255 -> 1 exactly
    assert got[0, 0, 0] == -1.0 and got[0, 0, 2] == 1.0


def test_normalize_rejects_unknown_name():
  with pytest.raises(ValueError, match="input.normalize='zero'"):
    augment.Normalize.from_name("zero")


def test_test_transform_is_resize_and_normalise():
  img = _smooth_image(50, 70)
  got = augment.TestTransform.from_config(_config())(_png(img))
  assert got.shape == (64, 64, 3) and got.dtype == np.float32
  # The official transform resizes with PIL's bilinear filter.
  ref = _half(np.asarray(Image.fromarray(img).resize((64, 64), Image.BILINEAR)))
  assert np.abs(got - ref).mean() < 1.0 / 127.5
  assert np.abs(got - ref).max() <= 4.0 / 127.5 + 1e-6


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
  with pytest.raises(ValueError, match="Could not decode"):
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
    out = transform(_png(src), np.random.default_rng(seed))
    left = int(round((out[0, 0, 0] + 1) * 127.5)) // 3
    top = int(round((out[0, 0, 1] + 1) * 127.5)) // 3
    assert 0 <= top <= 8 and 0 <= left <= 8
    np.testing.assert_allclose(
        out, _half(src[top:top + 64, left:left + 64]), atol=1e-6)
    seen.add((top, left))
  assert len(seen) > 5  # the window moves


def test_no_translation_is_a_plain_resize():
  img = _smooth_image(50, 70)
  cfg = _config(translate_prob=0.0)
  train = augment.TrainTransform.from_config(cfg)(
      _png(img), np.random.default_rng(0))
  test = augment.TestTransform.from_config(cfg)(_png(img))
  np.testing.assert_array_equal(train, test)


def test_flip_mirrors_columns():
  src = _coordinate_image(64, 64)
  flipped = augment.TrainTransform.from_config(_config(flip_prob=1.0))(
      _png(src), np.random.default_rng(0))
  np.testing.assert_allclose(flipped, _half(src[:, ::-1]), atol=1e-6)
  kept = augment.TrainTransform.from_config(_config(flip_prob=0.0))(
      _png(src), np.random.default_rng(0))
  np.testing.assert_allclose(kept, _half(src), atol=1e-6)


def test_flip_probability():
  src = _coordinate_image(64, 64)
  transform = augment.TrainTransform.from_config(_config(flip_prob=0.5))
  flips = sum(
      transform(_png(src), np.random.default_rng(s))[0, 0, 0] > 0  # col 63
      for s in range(200))
  assert 70 <= flips <= 130  # Binomial(200, 0.5): 6 sigma


def _erased_box(out: np.ndarray, fill) -> tuple[int, int, int, int] | None:
  hit = np.all(out == np.asarray(fill, np.float32), axis=-1)
  if not hit.any():
    return None
  rows, cols = np.flatnonzero(hit.any(1)), np.flatnonzero(hit.any(0))
  top, left = rows[0], cols[0]
  h, w = rows[-1] - top + 1, cols[-1] - left + 1
  assert hit.sum() == h * w, "erased pixels must form one rectangle"
  return top, left, h, w


def test_erasing_area_aspect_and_fill():
  # Fill values outside [-1, 1] cannot occur in a normalised image, so the
  # erased pixels are exactly the ones equal to the fill (set after
  # normalisation, not normalised again).
  fill = (3.0, -2.0, 5.0)
  img = np.full((64, 64, 3), 100, np.uint8)
  transform = augment.TrainTransform.from_config(
      _config(erase_prob=1.0, erase_fill=fill))
  areas = []
  for seed in range(200):
    out = transform(_png(img), np.random.default_rng(seed))
    box = _erased_box(out, fill)
    assert box is not None
    top, left, h, w = box
    assert h < 64 and w < 64
    # h = round(sqrt(A r)), w = round(sqrt(A / r)), A in [0.02, 0.4] * 64^2,
    # r in [0.3, 1/0.3]: rounding moves each side by at most 1/2.
    assert 0.02 * 64 * 64 - (h + w) / 2 - 0.25 <= h * w
    assert h * w <= 0.4 * 64 * 64 + (h + w) / 2 + 0.25
    assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3
    untouched = np.ones((64, 64), bool)
    untouched[top:top + h, left:left + w] = False
    np.testing.assert_allclose(out[untouched], 100 / 127.5 - 1, atol=1e-6)
    areas.append(h * w / (64 * 64))
  assert min(areas) < 0.08 and max(areas) > 0.3  # the range is explored


def test_erasing_probability_and_off():
  fill = (3.0, -2.0, 5.0)
  img = np.full((32, 32, 3), 50, np.uint8)
  half = augment.TrainTransform.from_config(
      _config(image_size=(32, 32), erase_prob=0.5, erase_fill=fill))
  erased = sum(_erased_box(half(_png(img), np.random.default_rng(s)), fill)
               is not None for s in range(200))
  assert 70 <= erased <= 130
  off = augment.TrainTransform.from_config(
      _config(image_size=(32, 32), erase_prob=0.0, erase_fill=fill))
  for s in range(20):
    assert _erased_box(off(_png(img), np.random.default_rng(s)), fill) is None


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
  np.testing.assert_array_equal(a, b)
  assert a.shape == (64, 64, 3) and a.dtype == np.float32
  c = transform(_png(img), np.random.default_rng([1, 2, 4]))
  assert not np.array_equal(a, c)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="erase_area"):
    augment.TrainTransform.from_config(_config(erase_area=(0.5, 0.2)))
  with pytest.raises(ValueError, match="erase_min_aspect"):
    augment.TrainTransform.from_config(_config(erase_min_aspect=0.0))
  with pytest.raises(ValueError, match="translate_scale"):
    augment.TrainTransform.from_config(_config(translate_scale=0.9))
