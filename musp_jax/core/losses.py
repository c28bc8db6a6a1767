"""Training losses: label-smoothed ID loss, batch-hard triplet loss, their sum.

All functions are pure and jit-compatible. Per-branch losses take one branch
and are vectorised over the P branches with `jax.vmap` in `total_loss`.

The spatial diversity term is computed inside the model
(`musp_jax.models.musp.diversity_term`, returned as `outputs["diversity"]`);
`total_loss` only weights it, so the attention maps never leave the model.

Conventions follow the official MUSP training code (docs/design.md section 2):
  * ID loss: cross-entropy against q = (1 - eps) * onehot + eps / K, averaged
    over the batch, summed over branches.
  * Triplet loss: Euclidean distance sqrt(max(d^2, 1e-12)) on pre-BN features,
    hardest positive / hardest negative per anchor, averaged over anchors,
    summed over branches. As in the official code the anchor itself counts as a
    positive, so an anchor whose identity has a single image in the batch uses
    the clamped self-distance sqrt(1e-12) as its hardest positive (its loss is
    max(0, 1e-6 - d_an + margin)). An anchor with no negative in the batch
    contributes zero loss (the official code adds a large constant that makes
    the hinge zero).
"""

from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# The official code clamps squared distances at 1e-12 before the square root:
# it keeps the gradient finite at zero distance (duplicates, self-pairs).
_MIN_SQUARED_DIST = 1e-12


def label_smoothed_cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array,
                                 epsilon: float) -> jax.Array:
  """Mean over the batch of CE(q, softmax(logits)), q = (1-eps)*onehot + eps/K."""
  num_classes = logits_BxK.shape[-1]
  targets_BxK = optax.smooth_labels(
      jax.nn.one_hot(labels_B, num_classes, dtype=logits_BxK.dtype), epsilon)
  return jnp.mean(optax.softmax_cross_entropy(logits_BxK, targets_BxK))


def euclidean_distances(feats_BxC: jax.Array) -> jax.Array:
  """Euclidean distances sqrt(max(|x|^2 + |y|^2 - 2 x.y, 1e-12)), (B, B).

  The diagonal is set to the clamp exactly: in float32 the expanded form leaves
  a rounding residue of order eps * |x|^2 there, which would otherwise become
  the hardest "positive" of anchors whose identity has a single image.
  """
  sq_norms_B = jnp.sum(feats_BxC * feats_BxC, axis=-1)
  # HIGHEST: default-precision matmuls may run in TF32/bf16 on accelerators,
  # and the expanded form cancels large terms.
  gram_BxB = jnp.matmul(feats_BxC, feats_BxC.T,
                        precision=jax.lax.Precision.HIGHEST)
  sq_dist_BxB = sq_norms_B[:, None] + sq_norms_B[None, :] - 2.0 * gram_BxB
  eye_BxB = jnp.eye(feats_BxC.shape[0], dtype=bool)
  sq_dist_BxB = jnp.where(eye_BxB, 0.0, sq_dist_BxB)
  return jnp.sqrt(jnp.maximum(sq_dist_BxB, _MIN_SQUARED_DIST))


def batch_hard_triplet(feats_BxC: jax.Array, labels_B: jax.Array,
                       margin: float | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch-hard triplet loss of one branch; soft margin when `margin` is None.

  Returns the loss (mean over anchors) and per-anchor arrays:
  dist_ap (hardest positive), dist_an (hardest negative, 0 where there is no
  negative), has_neg, and active (the anchor's triplet still violates the
  margin: d_an - d_ap < margin; for the soft margin d_an < d_ap).
  """
  dist_BxB = euclidean_distances(feats_BxC)
  same_BxB = labels_B[:, None] == labels_B[None, :]
  # Self is always in `same`, so every anchor has a positive.
  dist_ap_B = jnp.max(jnp.where(same_BxB, dist_BxB, -jnp.inf), axis=1)
  has_neg_B = jnp.any(~same_BxB, axis=1)
  dist_an_B = jnp.min(jnp.where(same_BxB, jnp.inf, dist_BxB), axis=1)
  # Keep infinities out of the arithmetic (and out of the gradient).
  dist_an_B = jnp.where(has_neg_B, dist_an_B, 0.0)
  gap_B = dist_ap_B - dist_an_B
  if margin is None:
    per_anchor_B = jax.nn.softplus(gap_B)
    active_B = gap_B > 0.0
  else:
    per_anchor_B = jax.nn.relu(gap_B + margin)
    active_B = gap_B + margin > 0.0
  per_anchor_B = jnp.where(has_neg_B, per_anchor_B, 0.0)
  stats = {
      "dist_ap": dist_ap_B,
      "dist_an": dist_an_B,
      "has_neg": has_neg_B,
      "active": active_B & has_neg_B,
  }
  return jnp.mean(per_anchor_B), stats


def id_accuracy(logits_BxK: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Fraction of the batch whose arg-max logit is the label."""
  return jnp.mean((jnp.argmax(logits_BxK, axis=-1) == labels_B).astype(jnp.float32))


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def total_loss(outputs: Mapping[str, jax.Array], labels_B: jax.Array,
               loss_config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, Any]]:
  """Weighted ID + triplet + diversity loss over all branches, and signals.

  Args:
    outputs: the model's output dict; uses "feats" (B, P, C) pre-BN,
      "logits" (B, P, K) and "diversity" () (absent means 0).
    labels_B: int labels in [0, K).
    loss_config: `config.loss` (id_weight, label_smoothing, triplet_weight,
      triplet_margin, diversity_weight).

  Returns:
    (loss, aux). aux holds the unweighted terms "id_loss", "triplet_loss",
    "diversity_loss" (each summed over branches), "loss", and the signals
    "id_accuracy" (P,) per branch, "dist_ap" / "dist_an" (mean hardest
    positive / negative distance over branches and anchors) and
    "active_triplets" (fraction of anchors still violating the margin).
  """
  for key in ("feats", "logits"):
    if key not in outputs:
      raise KeyError(f"total_loss: model outputs lack {key!r}; got {sorted(outputs)}")
  # At least float32 even when the model computes in bfloat16.
  feats_PxBxC = jnp.swapaxes(_at_least_f32(outputs["feats"]), 0, 1)
  logits_PxBxK = jnp.swapaxes(_at_least_f32(outputs["logits"]), 0, 1)
  if feats_PxBxC.shape[:2] != logits_PxBxK.shape[:2]:
    raise ValueError(
        f"total_loss: feats (B, P, C) = {outputs['feats'].shape} and logits "
        f"(B, P, K) = {outputs['logits'].shape} disagree on B or P")
  labels_B = labels_B.astype(jnp.int32)

  id_P = jax.vmap(label_smoothed_cross_entropy, in_axes=(0, None, None))(
      logits_PxBxK, labels_B, loss_config.label_smoothing)
  margin = loss_config.triplet_margin
  triplet = functools.partial(
      batch_hard_triplet, margin=None if margin is None else float(margin))
  triplet_P, stats = jax.vmap(triplet, in_axes=(0, None))(feats_PxBxC, labels_B)
  diversity = _at_least_f32(jnp.asarray(outputs.get("diversity", 0.0)))

  id_loss = jnp.sum(id_P)
  triplet_loss = jnp.sum(triplet_P)
  loss = (loss_config.id_weight * id_loss
          + loss_config.triplet_weight * triplet_loss
          + loss_config.diversity_weight * diversity)
  num_with_neg = jnp.maximum(jnp.sum(stats["has_neg"]), 1)
  aux = {
      "loss": loss,
      "id_loss": id_loss,
      "triplet_loss": triplet_loss,
      "diversity_loss": diversity,
      "id_accuracy": jax.vmap(id_accuracy, in_axes=(0, None))(logits_PxBxK, labels_B),
      "dist_ap": jnp.mean(stats["dist_ap"]),
      "dist_an": jnp.sum(stats["dist_an"]) / num_with_neg,
      "active_triplets": jnp.mean(stats["active"].astype(jnp.float32)),
  }
  return loss, aux
