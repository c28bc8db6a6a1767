"""Attention scores against hand-made maps and masks with known answers."""

import json
import math

import cv2
import numpy as np
import pytest

import tools_fixtures
from musp_jax.training import attention_scores as am
from musp_jax.data import datasets
from musp_jax.training import evaluator
from musp_jax.core import features
from musp_jax.data import augment
from musp_jax.runtime import process
from tfds_builders.synthetic_vehicles import render

# Tolerances: attention_metrics is float64 numpy (class_fractions rounds its result to
# float32 once, 6e-8 relative, hence rtol=1e-6 there); the hand-computed answers hold to
# that rounding, far inside assert_allclose's default rtol=1e-7 and approx's rel=1e-6.

def test_class_fractions_average_each_cells_region_exactly():
  mask = np.array([[1, 1, 0],
                   [1, 0, 0],
                   [0, 0, 2]])
  frac = am.class_fractions(mask, (2, 2), num_classes=3)
  # Cell (0, 0) covers rows and columns [0, 1.5): pixel weights 1, .5, .5, .25 (2.25 in
  # all); class 1 holds 1 + .5 + .5 of them, class 0 the .25 of pixel (1, 1).
  np.testing.assert_allclose(frac[0, 0], [0.25 / 2.25, 2 / 2.25, 0], rtol=1e-6)
  # Cell (1, 1): pixel (2, 2) (class 2) weighs 1, pixels (1, 2), (2, 1), (1, 1) 1.25.
  np.testing.assert_allclose(frac[1, 1], [1.25 / 2.25, 0, 1 / 2.25], rtol=1e-6)
  np.testing.assert_allclose(frac.sum(-1), 1.0, rtol=1e-6)
  # Whole-pixel cells are block means.
  big = np.kron(np.array([[0, 1], [2, 3]]), np.ones((3, 5), int))
  np.testing.assert_array_equal(am.class_fractions(big, (2, 2), num_classes=4),
                                np.eye(4)[[[0, 1], [2, 3]]])
  with pytest.raises(ValueError, match="class 7"):
    am.class_fractions(np.full((4, 4), 7), (2, 2), num_classes=7)


# Two images on a 2 x 2 grid, classes (background, body, lamps) one per cell; the vehicle
# sits in the bottom row of image 0 and in the top row of image 1.
BG, BODY, LAMPS = 0, 1, 2
LABELS = np.array([[[BG, BG], [BODY, LAMPS]],
                   [[BODY, LAMPS], [BG, BG]]])
FRACTIONS = np.eye(3)[LABELS]


def test_maps_that_follow_the_parts_score_perfectly():
  # Map 0 = body, map 1 = lamps, background map = background, in each image.
  attention = FRACTIONS[..., [BODY, LAMPS, BG]]
  s = am.score_maps(attention, FRACTIONS)
  np.testing.assert_allclose(s["mass_share"], np.eye(3)[[BODY, LAMPS, BG]])
  np.testing.assert_allclose(np.diag(s["iou"][:, [BODY, LAMPS, BG]]), 1.0)
  assert list(s["best_part"][:2]) == [BODY, LAMPS]
  assert s["parts_on_vehicle"] == 1.0 and s["background_on_background"] == 1.0
  assert s["background_taken"] == 1.0 and s["distinct_parts"] == 2 and s["part_iou"] == 1.0
  np.testing.assert_allclose(s["area"], [0.25, 0.25, 0.5])
  # Map 0 is (0, 0, 1, 0) then (1, 0, 0, 0): total variance 0.25 * 0.75 over the 8
  # values; its mean map (.5, 0, .5, 0) varies by 0.0625 over cells: 1 - 1/3 is
  # between images. The background map's mean map is flat: all of it is.
  np.testing.assert_allclose(s["image_dependence"], [2 / 3, 2 / 3, 1.0])


def test_a_positional_prior_scores_as_one():
  # The same maps for both images: right for image 0, wrong for image 1.
  fixed = FRACTIONS[0][..., [BODY, LAMPS, BG]]
  attention = np.stack([fixed, fixed])
  s = am.score_maps(attention, FRACTIONS)
  np.testing.assert_array_equal(s["image_dependence"], 0.0)
  assert s["image_dependence_mean"] == 0.0
  # Map 0 puts one unit on image 0's body and one on image 1's background.
  np.testing.assert_allclose(s["mass_share"][0], [0.5, 0.5, 0.0])
  # IoU: min sums to 1 (image 0's body cell); max to 1 + 2 (image 1: two cells).
  assert s["iou"][0, BODY] == pytest.approx(1 / 3)
  assert s["parts_on_vehicle"] == pytest.approx(0.5)
  assert s["background_on_background"] == pytest.approx(0.5)
  assert s["background_taken"] == pytest.approx(0.5)


def test_uniform_maps_and_a_dead_background():
  uniform = np.full((2, 2, 2, 3), 1 / 3)
  s = am.score_maps(uniform, FRACTIONS)
  np.testing.assert_allclose(s["mass_share"], np.tile([0.5, 0.25, 0.25], (3, 1)))
  # Body: min(1/3, 1) on its one cell per image; max 1 there plus 3 x 1/3 elsewhere.
  np.testing.assert_allclose(s["iou"][:, BODY], (2 / 3) / 4)
  np.testing.assert_array_equal(s["image_dependence"], 0.0)  # constant maps
  # The background map is dead: the parts split every cell.
  dead = np.concatenate([np.full((2, 2, 2, 2), 0.5), np.zeros((2, 2, 2, 1))], -1)
  s = am.score_maps(dead, FRACTIONS)
  assert math.isnan(s["background_on_background"]) and s["background_taken"] == 0.0
  # A dead map's image dependence is undefined and left out of the mean. One speck
  # of 1e-4 moves from map 1 to the background map in image 0's cell (0, 0): map 0
  # is constant (0); map 1's 8 values have variance (1/8)(7/8)e-8 and its mean map's
  # 4 cells (1/4)(3/4)(e-4 / 2)^2 = (3/7) of that, so 4/7 is between images.
  specks = dead.copy()
  specks[0, 0, 0] = [0.5, 0.5 - 1e-4, 1e-4]
  speckled = am.score_maps(specks, FRACTIONS)
  assert math.isnan(speckled["image_dependence"][2]) and speckled["area"][2] < am.DEAD_AREA
  np.testing.assert_allclose(speckled["image_dependence"][:2], [0.0, 4 / 7], rtol=1e-6)
  assert speckled["image_dependence_mean"] == pytest.approx(2 / 7, rel=1e-6)
  row = am.to_row(s, num_images=2, classes=("background", "body", "lamps"))
  assert row["background_on_background"] is None
  assert row["prototypes"][2]["image_dependence"] is None
  json.dumps(row, allow_nan=False)  # valid JSON
  scalars = am.attention_scalars(row)
  assert "attention/background_on_background" not in scalars
  assert scalars["attention/background_taken"] == 0.0
  assert scalars["attention/background/area"] == 0.0
  assert scalars["attention/part_1/vehicle_share"] == pytest.approx(0.5)
  table = am.markdown(row)
  assert "background" not in {k.split("/")[1] for k in scalars if k.endswith("vehicle_share")}
  assert "| background | 0.0 | - | - |" in table and "background pixels it takes 0.0" in table


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="same N, h, w"):
    am.score_maps(np.zeros((2, 2, 3, 3)), FRACTIONS)
  with pytest.raises(ValueError, match="n >= 2"):
    am.score_maps(np.ones((2, 2, 2, 1)), FRACTIONS)


def test_model_scores_on_a_split_match_a_direct_computation():
  """The batched, padded, sharded pass scores what a plain loop over the records does."""
  loaded = tools_fixtures.shared_model()
  config = loaded.config
  data_dir = tools_fixtures.shared_data_dir()
  kw = dict(data_dir=data_dir, builder_config=config.dataset.builder_config)
  query = datasets.load_split(config.dataset.name, "query", **kw)
  gallery = datasets.load_split(config.dataset.name, "gallery", **kw)
  sources = [list(query)[:5], list(gallery)[:6]]  # 5 + 6 images in batches of 8: padded
  assert am.has_part_masks(sources) and not am.has_part_masks([[{"image": b""}]])
  row = evaluator.attention_row(loaded.model, loaded.variables, sources, config,
                                process.make_mesh(), classes=render.PART_CLASSES)

  records = sources[0] + sources[1]
  pixels = np.stack([augment.resize(augment.decode(r["image"]), tuple(config.input.image_size))
                     for r in records])
  attention = np.asarray(features.jitted_attention(loaded.model, config.input.normalize)(
      loaded.variables, pixels))
  fractions = []
  for r in records:
    mask = cv2.imdecode(np.frombuffer(r["part_mask"], np.uint8), cv2.IMREAD_GRAYSCALE)
    onehot = np.eye(len(render.PART_CLASSES), dtype=np.float32)[mask]
    h, w = attention.shape[1:3]
    # OpenCV's area interpolation is the exact area average when shrinking.
    fractions.append(np.stack([cv2.resize(onehot[..., c], (w, h), interpolation=cv2.INTER_AREA)
                               for c in range(onehot.shape[-1])], -1))
  expected = am.to_row(am.score_maps(attention, np.stack(fractions)), len(records),
                      render.PART_CLASSES)
  assert row["num_images"] == 11
  flat, flat_expected = am.attention_scalars(row), am.attention_scalars(expected)
  assert flat.keys() == flat_expected.keys()
  # Attention maps of the shared model from two programs (padded batches over 8
  # devices, and all 11 at once) differ in their float32 rounding; the scores, shares
  # and IoUs in [0, 1] of those maps, differ by 2.2e-7 at most (measured on AVX2 and
  # AVX): abs=2e-5 leaves 90x.
  for k, v in flat_expected.items():
    assert flat[k] == pytest.approx(v, abs=2e-5), k
