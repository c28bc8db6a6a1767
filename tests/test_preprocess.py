"""Normalisation and random erasing on the device, against the host formulas they replace."""

import functools
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import common
from musp_jax.data import augment
from musp_jax.core import losses
from musp_jax.core import optim
from musp_jax.core import preprocess
from musp_jax.core import state as state_lib
from musp_jax.core import step as step_lib

FILL = (0.4914, 0.4822, 0.4465)


@pytest.mark.parametrize("name,mean,std", [
    ("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    pytest.param("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), marks=pytest.mark.numerics),
])
def test_normalize_constants(name, mean, std):
  values = np.array([[[[0, 128, 255], [255, 0, 64]]]], np.uint8)  # 1x1x2x3
  normalize = jax.jit(preprocess.normalize, static_argnums=1)
  got = np.asarray(normalize(values, name))
  assert got.dtype == np.float32 and got.shape == (1, 1, 2, 3)
  for c in range(3):
    for x in range(2):
      want = (values[0, 0, x, c] / 255.0 - mean[c]) / std[c]
      # Three float32 operations on values below 2.3 in size: a few ulps (2.4e-7);
      # measured 1.3e-7 (AVX2 and AVX).
      assert got[0, 0, x, c] == pytest.approx(want, abs=1e-6)
  if name == "half":  # 0 -> -1 and 255 -> 1 exactly
    assert got[0, 0, 0, 0] == -1.0 and got[0, 0, 0, 2] == 1.0
  # Float pixel values (an export's resized image) take the same formula.
  np.testing.assert_array_equal(normalize(values.astype(np.float32), name), got)


def test_normalize_rejects_unknown_name():
  with pytest.raises(ValueError, match="input.normalize='zero'"):
    preprocess.normalize(np.zeros((1, 2, 2, 3), np.uint8), "zero")


def test_erase_fills_exactly_the_box():
  images = np.arange(3 * 6 * 7 * 3, dtype=np.float32).reshape(3, 6, 7, 3)
  # A box inside, a box touching the bottom-right corner, no box.
  boxes = np.array([[1, 2, 3, 4], [4, 3, 2, 4], [0, 0, 0, 0]], np.int32)
  got = np.asarray(preprocess.erase(images, boxes, FILL))
  want = images.copy()
  want[0, 1:4, 2:6] = FILL
  want[1, 4:6, 3:7] = FILL
  np.testing.assert_array_equal(got, want)


def _png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _host_reference(pixels_HxWx3, box, name):
  """The host transform this replaces: normalise on the CPU, then fill the box.

  As it was written: mean = std = 0.5 as two float32 scalar passes, other constants
  through an exact float64 table rounded to float32.
  """
  mean, std = preprocess.NORMALIZE_CONSTANTS[name]
  if name == "half":
    x = pixels_HxWx3 * np.float32(1.0 / (255.0 * std[0]))
    x -= np.float32(mean[0] / std[0])
  else:
    table = ((np.arange(256.0)[:, None] / 255.0 - mean) / std).astype(np.float32)
    x = table[pixels_HxWx3, np.arange(3)]
  top, left, h, w = box
  x[top:top + h, left:left + w] = FILL
  return x


@pytest.mark.parametrize("name", ["half", pytest.param("imagenet", marks=pytest.mark.numerics)])
def test_train_images_equal_the_host_transform_on_the_same_seeds(name):
  cfg = common.get_config().input
  cfg.image_size = (48, 40)
  cfg.normalize = name
  transform = augment.TrainTransform.from_config(cfg)
  rng = np.random.default_rng(0)
  images = [_png(rng.integers(0, 256, (rng.integers(30, 90), rng.integers(30, 90), 3),
                              dtype=np.uint8)) for _ in range(6)]
  pixels, boxes, want = [], [], []
  for seed in range(24):  # the same seeds as a grain element uses: (seed, stream, step, slot)
    p, box = transform(images[seed % 6], np.random.default_rng([0, 1, 0, seed]))
    pixels.append(p)
    boxes.append(box)
    want.append(_host_reference(p, box, name))
  boxes = np.stack(boxes)
  assert 4 <= np.sum(boxes[:, 2] > 0) <= 20  # erase_prob 0.5: both cases occur
  got = jax.jit(functools.partial(preprocess.train_images, input_config=cfg))(
      {"image": np.stack(pixels), "erase": boxes})
  # The normalisation above plus the erase fill: a few float32 ulps of values below
  # 2.3 (2.4e-7 each); measured 2.4e-7 (AVX2 and AVX).
  np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=0, atol=1e-6)


def test_train_images_rejects_float_batches():
  cfg = common.get_config().input
  with pytest.raises(ValueError, match="uint8 and 'erase' boxes"):
    preprocess.train_images({"image": np.zeros((2, 4, 4, 3), np.float32),
                             "erase": np.zeros((2, 4), np.int32)}, cfg)
  with pytest.raises(ValueError, match=r"keys \['image', 'label'\]"):
    preprocess.train_images({"image": np.zeros((2, 4, 4, 3), np.uint8),
                             "label": np.zeros(2, np.int32)}, cfg)


class _Tiny(nn.Module):
  """Conv + BatchNorm + two branches: the output dict total_loss expects."""

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    feats = nn.Dense(2 * 4)(jnp.mean(x, axis=(1, 2))).reshape(-1, 2, 4)
    return {"feats": feats, "logits": nn.Dense(3)(feats)}


def test_train_step_feeds_the_model_normalised_erased_images():
  c = common.get_config()
  model, tx = _Tiny(), optim.make_optimizer(c.optim, 10)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  state, sharding = state_lib.create_train_state(model, tx, (8, 8), seed=0, mesh=mesh)
  batch = step_lib.random_batch(np.random.default_rng(1), 8, (8, 8), 3)
  assert batch["image"].dtype == np.uint8 and (batch["erase"][:, 2] > 0).any()
  images = np.stack([_host_reference(p, b, "half")
                     for p, b in zip(batch["image"], batch["erase"])])
  out, _ = model.apply(state.variables, images, train=True, mutable=["batch_stats"])
  want, _ = losses.total_loss(out, batch["label"], c.loss)
  step = step_lib.jit_step(model=model, tx=tx, loss_config=c.loss, input_config=c.input,
                           mesh=mesh, state_sharding=sharding)
  _, metrics = step(state, batch)
  # The same tiny model and loss, jitted or not, on inputs equal to 2.4e-7: measured
  # 7.5e-8 (1 ulp) on AVX2 and AVX.
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-6)
