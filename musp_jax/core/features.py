"""Images -> retrieval features: the one feature function, and the model signature.

docs/design.md section 4: each branch's pre-BN feature, L2-normalised, with the areas that
weight the CAM distance. With `flip`, an image and its mirror image are both embedded: the
per-branch features are normalised, summed and normalised again, and the areas are
averaged, so an image and its mirror image get the same features and areas.

`embed` is what evaluation (sharded, over grain batches), export (inside the serialized
function), and the tools (embed, search, visualize) all call. It takes pixels (uint8, as
the input workers hand them over) and normalises them on the device
(preprocess.normalize, the same function the train step uses). The model signature says
which feature sets may be compared: features of two models, or of one model fed
differently, must never be ranked against each other.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from musp_jax import models
from musp_jax.core import preprocess


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / ||x|| along `axis` (numpy or jax arrays, also under jit).

  All-zero vectors (zero-padded branches) stay zero.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  norm = xp.sqrt(xp.sum(x * x, axis=axis, keepdims=True))
  return x / xp.maximum(norm, eps)


class SignatureMismatchError(ValueError):
  """Features come from another model than the one they are compared with."""


def embed(variables: Any, pixels_BxHxWx3: jax.Array, *, model, flip: bool,
          normalize: str) -> tuple[jax.Array, jax.Array]:
  """Pixels (uint8, or float in [0, 255]) -> (features (B, P, C), areas (B, P)), float32.

  `normalize` is input.normalize of the model's run config. Features are
  L2-normalised per branch; all-zero (padded) branches stay zero.
  """
  images_BxHxWx3 = preprocess.normalize(pixels_BxHxWx3, normalize)
  out = model.apply(variables, images_BxHxWx3, train=False)
  feats = l2_normalize(out["feats"].astype(jnp.float32))
  areas = out["areas"].astype(jnp.float32)
  if flip:
    mirrored = model.apply(variables, images_BxHxWx3[:, :, ::-1, :], train=False)
    feats = l2_normalize(feats + l2_normalize(mirrored["feats"].astype(jnp.float32)))
    areas = (areas + mirrored["areas"].astype(jnp.float32)) / 2.0
  return feats, areas


@functools.cache
def jitted_embed(model, flip: bool, normalize: str):
  """jit(embed) for one model, compiled once per input shape."""
  preprocess.normalize_constants(normalize)  # a bad name fails here, not in the trace
  return jax.jit(functools.partial(embed, model=model, flip=flip, normalize=normalize))


def attention(variables: Any, pixels_BxHxWx3: jax.Array, *, model,
              normalize: str) -> jax.Array:
  """Pixels (as for `embed`) -> the MUSP head's attention maps (B, h, w, n), float32."""
  images_BxHxWx3 = preprocess.normalize(pixels_BxHxWx3, normalize)
  return model.apply(variables, images_BxHxWx3, train=False)["attention"].astype(jnp.float32)


@functools.cache
def jitted_attention(model, normalize: str):
  """jit(attention) for one model, compiled once per input shape."""
  preprocess.normalize_constants(normalize)
  return jax.jit(functools.partial(attention, model=model, normalize=normalize))


# --------------------------------------------------------------------------
# The model signature stored with saved features.


def weights_fingerprint(variables: Any) -> str:
  """A short hash of every array (by path), telling two sets of weights apart."""
  digest = hashlib.sha1()
  for path, value in sorted(
      (jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(variables)):
    digest.update(path.encode())
    digest.update(np.ascontiguousarray(jax.device_get(value)).tobytes())
  return digest.hexdigest()[:16]


def model_signature(config: Any, *, num_parts: int, channels: int, weights: str,
                    flip: bool = False) -> str:
  """A JSON string naming what makes two feature sets comparable.

  The architecture (models.architecture), P and C, the input size and normalisation,
  flip averaging and a fingerprint of the weights.
  """
  sig = dict(models.architecture(config.model))
  sig.update(parts=int(num_parts), channels=int(channels),
             image_size=[int(v) for v in config.input.image_size],
             normalize=config.input.normalize, flip=bool(flip), weights=weights)
  return json.dumps(sig, sort_keys=True)


def with_flip(signature: str, flip: bool) -> str:
  sig = json.loads(signature)
  sig["flip"] = bool(flip)
  return json.dumps(sig, sort_keys=True)


def signature_field(signature: str, key: str, default: Any = None) -> Any:
  """One field of a signature; `default` when absent or unreadable."""
  try:
    sig = json.loads(signature)
  except json.JSONDecodeError:
    return default
  return sig.get(key, default) if isinstance(sig, Mapping) else default


def check_signature(found: str, expected: str, *, found_where: str,
                    expected_where: str) -> None:
  """Raises SignatureMismatchError naming each differing field."""
  if found == expected:
    return
  try:
    a, b = json.loads(found or "{}"), json.loads(expected or "{}")
  except json.JSONDecodeError:
    a, b = {"signature": found}, {"signature": expected}
  diffs = [f"{k}: {found_where} has {a.get(k)!r}, {expected_where} has {b.get(k)!r}"
           for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
  raise SignatureMismatchError(
      f"{found_where} was made by another model than {expected_where}; features of "
      "different models cannot be compared:\n  " + "\n  ".join(diffs or ["(unreadable)"]))
