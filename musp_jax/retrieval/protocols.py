"""Per-dataset query/gallery/junk rules (docs/design.md section 5), one named row each.

Every protocol has the same signature, `protocol(splits, *, name, eval_config,
**overrides)`: `splits` maps the protocol's roles ("query" and "gallery", or "test")
to the extracted features, `name` prefixes the rows, and the result is {row name: row},
a row being the flat scalars of `ranking.result_row` (mAP, CMC@1/5/10, mINP,
num_queries). The dataset table (musp_jax/data/datasets.py, DATASETS) names each
dataset's protocol and the splits it reads; `run_protocol` calls a protocol by that
name:

  query_gallery   "<name>"                junk = same id and camera (VeRi-776, synthetic,
                                          the user's own data by default)
  query_gallery_keep_junk  "<name>"       no junk removed (own data built with --keep_junk)
  vehicle_id      "<name>/random10"       per id one random image is the gallery, the
                                          rest are queries; 10 seeded splits, averaged
                  "<name>/first"          the first listed image of each id is the
                                          gallery (the official code); no cameras, no junk
  veri_wild       "<name>/junk_removed" and "<name>/all" (with and without removing
                  same id + same camera)
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features

Features = saved_features.Features


def _options(eval_config: ml_collections.ConfigDict | None,
             overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments of ranking.evaluate from the c.eval section."""
  options = {}
  if eval_config is not None:
    options = dict(distance=eval_config.distance, rerank=eval_config.rerank,
                   query_block=eval_config.query_block)
    options.update({f"rerank_{k}": eval_config[f"rerank_{k}"]
                    for k in ("k1", "k2", "lambda") if f"rerank_{k}" in eval_config})
    options.update({k: eval_config[k] for k in ("aqe", "qe_times", "qe_k", "qe_alpha")
                    if k in eval_config})
  if "remove_junk" in overrides:
    raise ValueError("protocols: remove_junk is fixed by each dataset's protocol; "
                     "call ranking.evaluate directly to choose it")
  options.update(overrides)
  return options


def _roles(splits: Mapping[str, Features], need: tuple[str, ...], name: str
           ) -> list[Features]:
  missing = [r for r in need if r not in splits]
  if missing:
    raise ValueError(f"protocols: {name} needs splits {list(need)}, missing {missing} "
                     f"(got {sorted(splits)})")
  wrong = [r for r in need if not isinstance(splits[r], Features)]
  if wrong:
    raise TypeError(f"protocols: {name}'s splits {wrong} must be saved_features.Features, "
                    f"got {[type(splits[r]).__name__ for r in wrong]}")
  return [splits[r] for r in need]


def query_gallery(splits, *, name: str, eval_config=None,
                  **overrides) -> dict[str, dict[str, float]]:
  """Query vs gallery, junk = same id and camera (VeRi-776, synthetic vehicles)."""
  options = _options(eval_config, overrides)
  query, gallery = _roles(splits, ("query", "gallery"), name)
  result = ranking.evaluate(query, gallery, remove_junk=True, **options)
  return {name: ranking.result_row(result)}


def query_gallery_keep_junk(splits, *, name: str, eval_config=None,
                            **overrides) -> dict[str, dict[str, float]]:
  """Query vs gallery, nothing removed as junk (own data built with --keep_junk)."""
  options = _options(eval_config, overrides)
  query, gallery = _roles(splits, ("query", "gallery"), name)
  result = ranking.evaluate(query, gallery, remove_junk=False, **options)
  return {name: ranking.result_row(result)}


def vehicleid_random_split(ids: np.ndarray, *, seed: int, trial: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """(query, gallery) indices: one uniformly random image per id is gallery.

  A pure function of (ids, seed, trial); both index arrays are sorted.
  """
  rng = np.random.default_rng([seed, trial])
  perm = rng.permutation(len(ids))
  _, first = np.unique(ids[perm], return_index=True)
  gallery = np.sort(perm[first])
  return np.setdiff1d(np.arange(len(ids)), gallery), gallery


def vehicleid_first_split(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(query, gallery) indices: the first listed image of each id is gallery."""
  _, first = np.unique(ids, return_index=True)
  gallery = np.sort(first)
  return np.setdiff1d(np.arange(len(ids)), gallery), gallery


def vehicle_id(splits, *, name: str, eval_config=None,
               **overrides) -> dict[str, dict[str, float]]:
  """One VehicleID test list: random one-per-id galleries (averaged) and first-image."""
  options = _options(eval_config, overrides)
  trials = 10 if eval_config is None else eval_config.vehicleid_trials
  seed = 0 if eval_config is None else eval_config.vehicleid_seed
  if trials < 1:
    raise ValueError(f"eval.vehicleid_trials={trials}; expected >= 1")
  (test,) = _roles(splits, ("test",), name)
  rows = []
  for trial in range(trials):
    q, g = vehicleid_random_split(test.ids, seed=seed, trial=trial)
    rows.append(ranking.result_row(ranking.evaluate(
        test.take(q), test.take(g), remove_junk=False, **options)))
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  mean["num_queries"] = rows[0]["num_queries"]
  mean["trials"] = trials
  for k in ("mAP", "CMC@1", "CMC@5"):
    mean[f"{k}_std"] = float(np.std([r[k] for r in rows]))
  q, g = vehicleid_first_split(test.ids)
  first = ranking.result_row(ranking.evaluate(
      test.take(q), test.take(g), remove_junk=False, **options))
  return {f"{name}/random{trials}": mean, f"{name}/first": first}


def veri_wild(splits, *, name: str, eval_config=None,
              **overrides) -> dict[str, dict[str, float]]:
  """A VERI-Wild test set, with and without junk removal."""
  options = _options(eval_config, overrides)
  query, gallery = _roles(splits, ("query", "gallery"), name)
  return {
      f"{name}/junk_removed": ranking.result_row(
          ranking.evaluate(query, gallery, remove_junk=True, **options)),
      f"{name}/all": ranking.result_row(
          ranking.evaluate(query, gallery, remove_junk=False, **options)),
  }


PROTOCOLS = {"query_gallery": query_gallery, "query_gallery_keep_junk": query_gallery_keep_junk,
             "vehicle_id": vehicle_id, "veri_wild": veri_wild}


def run_protocol(protocol: str, splits: Mapping[str, Features], *, name: str,
                 eval_config: ml_collections.ConfigDict | None = None,
                 **overrides) -> dict[str, dict[str, float]]:
  """The protocol named `protocol` (a dataset's, musp_jax/data/datasets.py) on `splits`."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}.")
  return PROTOCOLS[protocol](splits, name=name, eval_config=eval_config, **overrides)
