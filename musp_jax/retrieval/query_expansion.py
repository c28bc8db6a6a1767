"""Alpha query expansion (alpha-QE; fast-reid's TEST.AQE), on plain and CAM features.

fast-reid 1.4's `aqe(query_feat, gallery_feat, qe_times, qe_k, alpha)`
(fastreid/evaluation/query_expansion.py) expands the joint query + gallery set X
(N, D) in place of the queries alone (alpha-QE and database-side augmentation
at once):

  repeat qe_times:
    S = X_n X_n^T, the cosine similarities (X_n: the rows of X L2-normalised)
    for every item i: N_i = its qe_k most similar items (itself included)
    x_i <- (1 / qe_k) sum_{j in N_i} S_ij^alpha x_j      (x_j not normalised)

and returns X, not normalised. `expand` computes exactly that for the plain
distances (`cosine`, `euclidean`: on the concatenated feature x, P*C), so with
plain (N, D) features `evaluate --aqe --distance cosine` is fast-reid's TEST.AQE
with TEST.METRIC cosine.

For the CAM distances (`cam_squared`, `cam`) the similarity and the average
follow the distance's branch weights:
  - S_ij is the CAM-weighted cosine sum_p w_p(i,j) cos(f_i^p, f_j^p), with
    w_p(i,j) = a_i^p a_j^p / sum_q a_i^q a_j^q, the distance's weights (for
    L2-normalised branches S = 1 - D_cam_squared / 2);
  - each branch averages the neighbours' branch features weighted by their
    areas as well, f_i^p <- (1 / qe_k) sum_j S_ij^alpha a_j^p f_j^p: a part
    is learnt from the neighbours where it is visible;
  - after the last round every branch is L2-normalised again (the model's
    features are, docs/design.md section 4, and the distances assume it), and the
    areas are kept: an image's part areas say where its parts are, which
    expansion does not change.
With one branch and unit areas (plain features) this is fast-reid's form,
normalised at the end.

Neighbours come from musp_jax.retrieval.neighbours' exact, streamed all-pairs search
(ties: lower index first; fast-reid's argpartition leaves their order to the
algorithm). Cost: (Q+G)^2 / 2 similarity evaluations per round, several times
the Q x G of the evaluation itself; memory: a second copy of the features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from musp_jax.core import features
from musp_jax.retrieval import neighbours
from musp_jax.retrieval.saved_features import Features

_EPS = 1e-12  # torch.nn.functional.normalize's


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


def _prepare_plain(feats_NxPxC, areas_NxP):
  del areas_NxP
  x = feats_NxPxC.reshape(feats_NxPxC.shape[0], -1)
  return (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS),)


def _pair_plain(a, b):
  return -_dot(a[0], b[0])  # smaller = nearer


def _prepare_cam(feats_NxPxC, areas_NxP):
  norm = jnp.linalg.norm(feats_NxPxC, axis=-1, keepdims=True)
  unit = feats_NxPxC / jnp.maximum(norm, _EPS)
  n = feats_NxPxC.shape[0]
  return (unit * areas_NxP[..., None]).reshape(n, -1), areas_NxP


def _pair_cam(a, b):
  return -_dot(a[0], b[0]) / _dot(a[1], b[1])


SIMILARITIES = {"plain": (_prepare_plain, _pair_plain), "cam": (_prepare_cam, _pair_cam)}


def check_parameters(qe_times: int, qe_k: int, alpha: float) -> None:
  for name, value in (("qe_times", qe_times), ("qe_k", qe_k)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"aqe {name}={value!r}; expected an integer >= 1")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
    raise ValueError(f"aqe alpha={alpha!r}; expected a finite number")


def expand_arrays(parts: list[tuple[np.ndarray, np.ndarray]], *, kind: str,
                  qe_times: int = 1, qe_k: int = 10, alpha: float = 3.0,
                  block: int = neighbours.DEFAULT_BLOCK, progress: bool = False
                  ) -> list[np.ndarray]:
  """The expanded features (N, P, C) of each (feats, areas) part, not normalised.

  kind: "plain" (concatenated feature, fast-reid's form) or "cam" (module
  docstring); the parts are expanded as one joint set.
  """
  check_parameters(qe_times, qe_k, alpha)
  prepare, pair = SIMILARITIES[kind]
  areas = [np.asarray(a, np.float32) for _, a in parts]
  feats = [np.asarray(f, np.float32) for f, _ in parts]
  for _ in range(qe_times):
    items = neighbours.JointItems(list(zip(feats, areas)))
    n = len(items)
    k = min(qe_k, n)
    near = neighbours.nearest(items, k, prepare=prepare, pair=pair, block=block,
                              progress=progress, desc="query expansion")
    weight_NxK = np.power(-near.score, np.float32(alpha)).astype(np.float32)
    out = np.empty((n,) + items.item_shape, np.float32)
    chunk = max(1, 2**24 // (k * int(np.prod(items.item_shape))))
    for lo in range(0, n, chunk):
      hi = min(lo + chunk, n)
      f, a = items.rows(near.index[lo:hi].reshape(-1))
      f = f.reshape(hi - lo, k, *items.item_shape)
      w = weight_NxK[lo:hi, :, None]
      if kind == "cam":
        w = w * a.reshape(hi - lo, k, -1)
      # fast-reid: np.mean(feats * weights, axis=0), in float32.
      out[lo:hi] = np.mean(f * w[..., None], axis=1)
    starts = np.cumsum([0] + [len(f) for f in feats])
    feats = [out[s:e] for s, e in zip(starts[:-1], starts[1:])]
  return feats


def expand(query: Features, gallery: Features, *,
           distance: str = "cam_squared", qe_times: int = 1, qe_k: int = 5,
           alpha: float = 3.0, progress: bool = False
           ) -> tuple[Features, Features]:
  """Query and gallery features after alpha query expansion for `distance`."""
  kind = "cam" if distance in ("cam_squared", "cam") else "plain"
  q_feats, g_feats = expand_arrays([(query.feats, query.areas),
                                    (gallery.feats, gallery.areas)], kind=kind,
                                   qe_times=qe_times, qe_k=qe_k, alpha=alpha,
                                   progress=progress)
  if kind == "cam":
    q_feats, g_feats = (features.l2_normalize(f) for f in (q_feats, g_feats))
  return (Features(q_feats, query.areas, query.ids, query.cams,
                             query.file_names, query.model_signature),
          Features(g_feats, gallery.areas, gallery.ids, gallery.cams,
                             gallery.file_names, gallery.model_signature))
