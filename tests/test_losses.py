"""Losses against explicit-loop numpy references, sharding and finite differences."""

import math

import flax.linen as nn
import jax
from jax import flatten_util
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
import pytest

from configs import common
from musp_jax.core import losses
from musp_jax.models import musp

# Tolerances: float32 losses (XLA) against float64 loops. Each value is a sum of at most
# ~100 float32 terms (16 x 16 distances of 16 channels, 9 x 7 logits), K u <= 6e-6:
# rtol=1e-5. Counts and accuracies are exact ratios rounded once to float32 (6e-8):
# rtol=1e-6. Measured on AVX2 and AVX: at most 4% of each bound.


def _loss_config(**overrides) -> ml_collections.ConfigDict:
  cfg = common.get_config().loss
  for key, value in overrides.items():
    if key not in cfg:
      raise KeyError(f"config.loss has no {key!r}")
    cfg[key] = value
  return cfg


# ---------------------------------------------------------------- references
def ref_cross_entropy(logits, labels, eps):
  """Mean over rows of -sum_k q_k log softmax_k, q = (1-eps)*onehot + eps/K."""
  batch, num_classes = logits.shape
  total = 0.0
  for i in range(batch):
    row = [float(v) for v in logits[i]]
    top = max(row)
    log_z = top + math.log(sum(math.exp(v - top) for v in row))
    for k in range(num_classes):
      q = (1.0 - eps) * (1.0 if k == labels[i] else 0.0) + eps / num_classes
      total -= q * (row[k] - log_z)
  return total / batch


def ref_triplet(feats, labels, margin):
  """Batch-hard triplet by loops: returns loss, d_ap list, d_an list, active list."""
  batch = len(labels)
  loss, d_aps, d_ans, actives = 0.0, [], [], []
  for i in range(batch):
    hardest_pos, hardest_neg = -math.inf, math.inf
    for j in range(batch):
      sq = sum((float(a) - float(b)) ** 2 for a, b in zip(feats[i], feats[j]))
      dist = math.sqrt(max(sq, 1e-12))
      if labels[j] == labels[i]:  # includes j == i, as the official code
        hardest_pos = max(hardest_pos, dist)
      else:
        hardest_neg = min(hardest_neg, dist)
    d_aps.append(hardest_pos)
    if hardest_neg == math.inf:  # no negative: no loss
      d_ans.append(None)
      actives.append(False)
      continue
    d_ans.append(hardest_neg)
    if margin is None:
      loss += math.log1p(math.exp(hardest_pos - hardest_neg))
      actives.append(hardest_neg < hardest_pos)
    else:
      loss += max(0.0, hardest_pos - hardest_neg + margin)
      actives.append(hardest_pos - hardest_neg + margin > 0)
  return loss / batch, d_aps, d_ans, actives


def _batch(rng, labels, num_feats, scale=1.0):
  feats = rng.normal(size=(len(labels), num_feats)).astype(np.float32) * scale
  return feats, np.asarray(labels, np.int32)


# Eager op-by-op dispatch is slow on a loaded CPU; jit once per margin.
_triplet = jax.jit(losses.batch_hard_triplet, static_argnums=2)


# A batch with ties (exact duplicates, within and across identities) and
# identities with a single image (ids 1 and 5).
_LABELS_WITH_SINGLES = [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5]


def _with_duplicates(feats):
  feats = feats.copy()
  feats[2] = feats[0]  # same identity: hardest positive unaffected, a zero pair
  feats[5] = feats[1]  # different identities: hardest negative at distance 0
  feats[7] = feats[6]
  feats[11] = feats[6]  # tie between two negatives of anchor 6
  return feats


def _zero_distance_error(feats_BxC) -> float:
  """How far from 0 the distance of two identical features may come out.

  The expanded |x|^2 + |y|^2 - 2 x.y (as the official code computes it) leaves a
  float32 rounding residue of up to C * eps * |x|^2 where two features are identical,
  so a true distance of 0 comes out as up to sqrt(C * eps) * |x|; its size depends on
  the CPU's summation order. Random features keep the tight bound.
  """
  return float(np.sqrt(feats_BxC.shape[-1] * np.finfo(np.float32).eps)
               * np.linalg.norm(feats_BxC, axis=-1).max())


# ---------------------------------------------------------------- ID loss
@pytest.mark.parametrize("eps", [0.0, pytest.param(0.1, marks=pytest.mark.numerics), 0.3])
def test_cross_entropy_matches_loops(eps):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(9, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=9).astype(np.int32)
  got = jax.jit(losses.label_smoothed_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels),
                                                     eps)
  np.testing.assert_allclose(float(got), ref_cross_entropy(logits, labels, eps), rtol=1e-5)


# ---------------------------------------------------------------- triplet
@pytest.mark.parametrize("margin", [pytest.param(0.3, marks=pytest.mark.numerics), 1.0, None])
@pytest.mark.parametrize("case", ["random", "duplicates_and_singles"])
def test_triplet_matches_loops(margin, case):
  rng = np.random.default_rng(1)
  if case == "random":
    # Clustered by identity, at a scale where the margin separates some anchors.
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    centers = rng.normal(size=(4, 16))
    feats = ((centers[labels] + 0.5 * rng.normal(size=(16, 16))) * 0.25).astype(np.float32)
  else:
    feats, labels = _batch(rng, _LABELS_WITH_SINGLES, 16)
    feats = _with_duplicates(feats) * 0.1
  loss, stats = _triplet(jnp.asarray(feats), jnp.asarray(labels), margin)
  ref_loss, d_aps, d_ans, actives = ref_triplet(feats, labels, margin)
  # Random features keep their distances (~0.5) away from 0, where the expanded form
  # cancels: 2e-6 (16 ulps there) beside rtol; duplicates need _zero_distance_error.
  atol = _zero_distance_error(feats) if case == "duplicates_and_singles" else 2e-6
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(np.asarray(stats["dist_ap"]), d_aps, rtol=1e-5, atol=atol)
  has_neg = np.array([d is not None for d in d_ans])
  np.testing.assert_array_equal(np.asarray(stats["has_neg"]), has_neg)
  np.testing.assert_allclose(np.asarray(stats["dist_an"])[has_neg],
                             [d for d in d_ans if d is not None], rtol=1e-5, atol=atol)
  np.testing.assert_array_equal(np.asarray(stats["active"]), actives)
  if case == "random" and margin == 0.3:
    assert 0 < sum(actives) < len(actives), "test data must exercise both hinge sides"


def test_triplet_single_image_identity_uses_clamped_self_distance():
  # Identity 1 has one image: its hardest positive is itself at sqrt(1e-12).
  feats = np.array([[0.0, 0.0], [0.0, 0.1], [1.0, 0.0], [0.0, 0.6]], np.float32)
  labels = np.array([0, 0, 1, 2], np.int32)
  loss, stats = _triplet(jnp.asarray(feats), jnp.asarray(labels), 0.3)
  d_ap = np.asarray(stats["dist_ap"])
  np.testing.assert_allclose(d_ap, [0.1, 0.1, 1e-6, 1e-6], rtol=1e-5)
  # By hand, hinge(d_ap - d_an + 0.3) per anchor: 0: 0.1 - 0.6 -> 0; 1: 0.1 - 0.5 -> 0;
  # 2: 1e-6 - 1.0 -> 0; 3: 1e-6 - 0.5 -> 0 (every hinge is exactly 0; measured 0).
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-7)
  feats[3] = [0.0, 0.2]
  loss, _ = _triplet(jnp.asarray(feats), jnp.asarray(labels), 0.3)
  # 0: 0.1 - 0.2 + 0.3; 1: 0.1 - 0.1 + 0.3; 2: 1e-6 - 1.0 + 0.3 -> 0; 3: 1e-6 - 0.1 + 0.3.
  expected = (0.2 + 0.3 + 0.0 + (0.2 + 1e-6)) / 4
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_triplet_without_negatives_is_zero():
  rng = np.random.default_rng(2)
  feats, labels = _batch(rng, [3] * 6, 8)
  loss, stats = _triplet(jnp.asarray(feats), jnp.asarray(labels), 0.3)
  assert float(loss) == 0.0
  assert not np.asarray(stats["has_neg"]).any()
  grads = jax.jit(jax.grad(lambda f: losses.batch_hard_triplet(f, jnp.asarray(labels), 0.3)[0]))(
      jnp.asarray(feats))
  assert np.isfinite(np.asarray(grads)).all()


@pytest.mark.numerics
def test_pairwise_distance_is_precise_for_large_norms():
  # The expanded form |x|^2+|y|^2-2xy cancels; the diagonal must still be the clamp.
  rng = np.random.default_rng(3)
  feats = (rng.normal(size=(6, 64)) * 30 + 50).astype(np.float32)
  dist = np.asarray(jax.jit(losses.euclidean_distances)(jnp.asarray(feats)))
  np.testing.assert_allclose(np.diag(dist), 1e-6, rtol=1e-6)  # the clamp, rounded once
  ref = np.sqrt(((feats[:, None].astype(np.float64) - feats[None]) ** 2).sum(-1))
  off = ~np.eye(6, dtype=bool)
  # Were the square expanded, |x|^2 + |y|^2 (~4 d^2 here) would cancel over C = 64
  # terms: C u x 4 / 2 = 7.7e-6 relative on d; 1e-4 allows 13x that. Measured 3.2e-7.
  np.testing.assert_allclose(dist[off], ref[off], rtol=1e-4)


# ---------------------------------------------------------------- total loss
def _outputs(rng, labels, num_branches, channels, num_classes, diversity):
  batch = len(labels)
  feats = rng.normal(size=(batch, num_branches, channels)).astype(np.float32) * 0.15
  logits = rng.normal(size=(batch, num_branches, num_classes)).astype(np.float32) * 2
  # Make branch 0 predict the label for most rows, so accuracies differ by branch.
  logits[np.arange(batch)[: batch - 3], 0, labels[: batch - 3]] += 10
  return {"feats": feats, "logits": logits, "diversity": np.float32(diversity)}


@pytest.mark.parametrize("margin", [pytest.param(0.3, marks=pytest.mark.numerics), None])
def test_total_loss_matches_loops(margin):
  rng = np.random.default_rng(4)
  labels = np.asarray(_LABELS_WITH_SINGLES, np.int32)
  num_branches, num_classes = 3, 6
  out = _outputs(rng, labels, num_branches, 8, num_classes, diversity=0.7)
  out["feats"][:, 1] = _with_duplicates(out["feats"][:, 1])
  cfg = _loss_config(id_weight=0.5, triplet_weight=2.0, diversity_weight=3.0,
                     label_smoothing=0.1, triplet_margin=margin)
  loss, aux = jax.jit(lambda o, y: losses.total_loss(o, y, cfg))(
      jax.tree.map(jnp.asarray, out), jnp.asarray(labels))

  id_terms = [ref_cross_entropy(out["logits"][:, p], labels, 0.1) for p in range(num_branches)]
  tri = [ref_triplet(out["feats"][:, p], labels, margin) for p in range(num_branches)]
  id_loss = sum(id_terms)
  tri_loss = sum(t[0] for t in tri)
  # Branch 1 holds identical features (see _zero_distance_error).
  atol = _zero_distance_error(out["feats"][:, 1])
  np.testing.assert_allclose(float(aux["id_loss"]), id_loss, rtol=1e-5)
  np.testing.assert_allclose(float(aux["triplet_loss"]), tri_loss, rtol=1e-5, atol=atol)
  np.testing.assert_allclose(float(aux["diversity_loss"]), 0.7, rtol=1e-6)  # float32 0.7
  np.testing.assert_allclose(float(loss), 0.5 * id_loss + 2.0 * tri_loss + 3.0 * 0.7,
                             rtol=1e-5, atol=2.0 * atol)
  np.testing.assert_allclose(float(aux["loss"]), float(loss))  # the same value

  accs = []
  for p in range(num_branches):
    hits = 0
    for i, label in enumerate(labels):
      row = list(out["logits"][i, p])
      hits += row.index(max(row)) == label
    accs.append(hits / len(labels))
  np.testing.assert_allclose(np.asarray(aux["id_accuracy"]), accs, rtol=1e-6)
  assert accs[0] > accs[1]
  all_ap = [d for t in tri for d in t[1]]
  all_an = [d for t in tri for d in t[2] if d is not None]
  all_active = [a for t in tri for a in t[3]]
  np.testing.assert_allclose(float(aux["dist_ap"]), np.mean(all_ap), rtol=1e-5, atol=atol)
  np.testing.assert_allclose(float(aux["dist_an"]), np.mean(all_an), rtol=1e-5, atol=atol)
  np.testing.assert_allclose(float(aux["active_triplets"]), np.mean(all_active), rtol=1e-6)


def test_total_loss_names_missing_key():
  with pytest.raises(KeyError, match="feats"):
    losses.total_loss({"logits": jnp.zeros((2, 1, 3))}, jnp.zeros(2, jnp.int32),
                      _loss_config())


@pytest.mark.numerics
def test_total_loss_sharded_equals_single_device():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py provides 8 CPU devices"
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rng = np.random.default_rng(5)
  labels = np.repeat(np.arange(8), 4).astype(np.int32)  # P=8 ids x K=4 = 32
  rng.shuffle(labels)  # identities spread over shards
  out = _outputs(rng, labels, 2, 16, 10, diversity=0.25)
  cfg = _loss_config()

  fn = lambda o, y: losses.total_loss(o, y, cfg)
  single = jax.jit(fn)(jax.device_put(out, devices[0]), jax.device_put(labels, devices[0]))

  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded_out = {
      "feats": jax.device_put(out["feats"], batch_sharding),
      "logits": jax.device_put(out["logits"], batch_sharding),
      "diversity": jax.device_put(out["diversity"], replicated),
  }
  sharded_labels = jax.device_put(labels, batch_sharding)
  assert len(sharded_out["feats"].addressable_shards) == 8
  sharded = jax.jit(fn, out_shardings=replicated)(sharded_out, sharded_labels)

  loss_single, aux_single = single
  loss_sharded, aux_sharded = sharded
  assert float(aux_single["triplet_loss"]) > 0
  # The same float32 sums over 32 items, split over 8 devices: measured equal (loss)
  # and within 1 ulp (6e-8, the statistics) on AVX2 and AVX.
  np.testing.assert_allclose(float(loss_sharded), float(loss_single), rtol=1e-6)
  for key in aux_single:
    np.testing.assert_allclose(np.asarray(aux_sharded[key]), np.asarray(aux_single[key]),
                               rtol=1e-6, atol=1e-7, err_msg=key)
  ref = sum(ref_triplet(out["feats"][:, p], labels, 0.3)[0] for p in range(2))
  np.testing.assert_allclose(float(aux_sharded["triplet_loss"]), ref, rtol=1e-5)


# ---------------------------------------------------------------- gradients
class _TinyReID(nn.Module):
  """feats / logits / diversity from a vector input: total_loss's whole input."""
  num_branches: int = 2
  channels: int = 5
  num_classes: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxD):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.dtype, name=name)
    batch = x_BxD.shape[0]
    feats = dense(self.num_branches * self.channels, "embed")(x_BxD)
    feats_BxPxC = feats.reshape(batch, self.num_branches, self.channels)
    classifier = self.param("classifier", nn.initializers.normal(0.5),
                            (self.num_branches, self.channels, self.num_classes), self.dtype)
    logits_BxPxK = jnp.einsum("bpc,pck->bpk", feats_BxPxC, classifier)
    maps_BxN = jax.nn.softmax(dense(3, "attention")(x_BxD), axis=-1)
    return {"feats": feats_BxPxC, "logits": logits_BxPxK,
            "diversity": jnp.sum(jnp.prod(maps_BxN, axis=-1))}


def test_total_loss_gradient_matches_finite_differences():
  labels = jnp.asarray([0, 0, 1, 1, 1, 2, 3, 3, 2, 0])
  cfg = _loss_config(triplet_weight=1.5, diversity_weight=0.7)
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    model = _TinyReID(dtype=jnp.float64)
    x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float64)
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    flat_p, unravel = flatten_util.ravel_pytree(params)

    # Everything on the flat vector inside jit: eager per-leaf slicing is slow.
    def loss_and_aux(flat):
      return losses.total_loss(model.apply({"params": unravel(flat)}, x), labels, cfg)

    (loss, aux), flat_g = jax.jit(jax.value_and_grad(loss_and_aux, has_aux=True))(flat_p)
    assert loss.dtype == jnp.float64
    assert 0 < float(aux["active_triplets"]), "the triplet term must contribute"
    assert np.isfinite(np.asarray(flat_g)).all()
    h = 1e-6
    directional = jax.jit(
        lambda v: (loss_and_aux(flat_p + h * v)[0] - loss_and_aux(flat_p - h * v)[0]) / (2 * h))
    for _ in range(4):
      v = rng.normal(size=flat_p.shape)
      # float64 central differences: truncation h^2 |f^(3)| ~ 1e-12, rounding
      # eps |f| / h ~ 1e-9 (atol); rtol 1e-6. Measured 0.1% of the bound.
      np.testing.assert_allclose(float(np.dot(np.asarray(flat_g), v)),
                                 float(directional(jnp.asarray(v))), rtol=1e-6, atol=1e-9)


def test_total_loss_gradient_finite_with_duplicates_float32():
  labels = np.asarray(_LABELS_WITH_SINGLES, np.int32)
  rng = np.random.default_rng(7)
  out = _outputs(rng, labels, 2, 8, 6, diversity=0.0)
  out["feats"][:, 0] = _with_duplicates(out["feats"][:, 0])
  out["feats"][:, 1] = out["feats"][0, 1]  # every feature identical: all distances 0
  grad_fn = jax.jit(jax.grad(
      lambda o: losses.total_loss(o, jnp.asarray(labels), _loss_config())[0]))
  grads = grad_fn(jax.tree.map(jnp.asarray, out))
  for key in ("feats", "logits"):
    assert np.isfinite(np.asarray(grads[key])).all(), key
  assert np.abs(np.asarray(grads["feats"])).sum() > 0


# ---------------------------------------------------------------- diversity
@pytest.mark.numerics
def test_diversity_term_matches_loops():
  """The model's diversity term (owned by the model) against explicit loops."""
  rng = np.random.default_rng(8)
  batch, height, width, n = 2, 3, 4, 4
  logits = rng.normal(size=(batch, height, width, n)).astype(np.float32)
  maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for keep_background, num_maps in ((True, n), (False, n - 1)):
    expected = 0.0
    for b in range(batch):
      for i in range(height):
        for j in range(width):
          prod = 1.0
          for k in range(num_maps):
            prod *= float(maps[b, i, j, k])
          expected += prod
    got = musp.diversity_term(jnp.asarray(maps), keep_background=keep_background)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
