"""The one feature function and the model signature."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tools_fixtures
from configs import common
from musp_jax.core import features
from musp_jax.core import state
from musp_jax.models import build_model


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


def _images(n=3, size=64, seed=0):
  """uint8 pixels, as the input pipeline and the export hand them to `embed`."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)),
                     jnp.uint8)


def _embed(variables, x, *, model, flip):
  return features.embed(variables, x, model=model, flip=flip, normalize="half")


@pytest.mark.numerics
def test_features_are_each_branchs_pre_bn_feature_l2_normalised(loaded):
  assert loaded.config.input.normalize == "half"
  x = _images()
  feats, areas = _embed(loaded.variables, x, model=loaded.model, flip=False)
  # (v / 255 - 0.5) / 0.5, in XLA's float32 order (tests/test_embed.py).
  normalised = (np.asarray(x, np.float32) - 127.5) * np.float32(1 / 127.5)
  out = loaded.model.apply(loaded.variables, normalised, train=False)
  raw = np.asarray(out["feats"], np.float64)
  # The same network ops on both sides; the normalisation is float32 against float64:
  # its rounding random-walks to sqrt(512) u = 1.4e-6 (rtol 1e-5; atol for zeros).
  # Measured 1% of the bound; the norms 1.2e-7 (2 ulps) on AVX2 and AVX.
  np.testing.assert_allclose(feats, raw / np.linalg.norm(raw, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(areas, out["areas"])
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-6)


def test_flip_averaging_is_mirror_invariant(loaded):
  x = _images(seed=1)
  feats, areas = _embed(loaded.variables, x, model=loaded.model, flip=True)
  mirrored = _embed(loaded.variables, x[:, :, ::-1], model=loaded.model, flip=True)
  # The same two forward passes in the other order, added (commutative): measured
  # equal on AVX2 and AVX; the bounds are a few float32 ulps of the values.
  np.testing.assert_allclose(mirrored[0], feats, atol=2e-6)
  np.testing.assert_allclose(mirrored[1], areas, atol=1e-7)
  plain, _ = _embed(loaded.variables, x, model=loaded.model, flip=False)
  assert np.abs(plain - feats).max() > 1e-3  # the model itself is not mirror-symmetric
  # By definition: normalise each view, add, normalise again; areas averaged.
  a = _embed(loaded.variables, x, model=loaded.model, flip=False)
  b = _embed(loaded.variables, x[:, :, ::-1], model=loaded.model, flip=False)
  both = np.asarray(a[0], np.float64) + np.asarray(b[0], np.float64)
  # float32 against float64 normalisation of unit 512-vectors (elements ~0.05): a
  # relative sqrt(512) u = 1.4e-6 is ~1e-7 absolute; measured 2.4e-8 (AVX2, AVX).
  np.testing.assert_allclose(feats, both / np.linalg.norm(both, axis=-1, keepdims=True),
                             atol=1e-6)
  np.testing.assert_allclose(areas, (np.asarray(a[1]) + np.asarray(b[1])) / 2, atol=1e-7)


def test_zero_padded_branches_stay_zero():
  """Paper text: parts of c = 512 / (n - 1) = 256 channels beside a 512-d global."""
  c = common.get_config("runlocal,paper,n=3")
  model = build_model(c.model, 4)
  variables = state.init_variables(model, (32, 32), 0)
  feats, _ = _embed(variables, _images(2, 32), model=model, flip=True)
  assert feats.shape == (2, 3, 512)
  np.testing.assert_array_equal(feats[:, :2, 256:], 0.0)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-6)  # 6e-8 measured


def test_signature_names_what_differs(loaded):
  sig = json.loads(loaded.signature)
  assert (sig["value_channels"], sig["global_branch"], sig["parts"]) == (512, True, 3)
  assert sig["image_size"] == [64, 64] and sig["flip"] is False
  assert features.signature_field(loaded.signature, "head") == "musp"
  assert features.signature_field("not json", "head", "?") == "?"
  flipped = features.with_flip(loaded.signature, True)
  features.check_signature(flipped, flipped, found_where="a", expected_where="b")
  with pytest.raises(features.SignatureMismatchError,
                     match="flip: q.npz has True, gallery.npz has False"):
    features.check_signature(flipped, loaded.signature, found_where="q.npz",
                             expected_where="gallery.npz")


def test_weights_fingerprint_tells_weights_apart(loaded):
  a = features.weights_fingerprint(loaded.variables)
  changed = jax.tree.map(lambda v: v, loaded.variables)
  changed["params"]["head"]["attention_conv"]["bias"] = (
      changed["params"]["head"]["attention_conv"]["bias"] + 1e-3)
  assert a == features.weights_fingerprint(loaded.variables)
  assert a != features.weights_fingerprint(changed)
