"""Per-dataset query/gallery/junk rules (SPEC section 5), one named row each.

Each function takes the extracted features of a dataset's evaluation splits
and returns {row name: row}, a row being the flat scalars of
`retrieval.result_row` (mAP, CMC@1/5/10, mINP, num_queries):

  VeRi-776    "veri776"                  junk = same id and camera
  VehicleID   "vehicleid_<size>/random10"  per id one random image is the
                                           gallery, the rest are queries;
                                           10 seeded splits, averaged
              "vehicleid_<size>/first"   the first listed image of each id is
                                           the gallery (the official code)
              no cameras, so no junk
  VERI-Wild   "veri_wild_<size>/junk_removed" and "veri_wild_<size>/all"
              (with and without removing same id + same camera)
  synthetic   "synthetic_vehicles"       as VeRi-776
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from musp_jax import retrieval

Features = retrieval.Features
DATASETS = ("veri776", "vehicle_id", "veri_wild", "synthetic_vehicles")


def _options(eval_config: ml_collections.ConfigDict | None,
             overrides: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments of retrieval.evaluate from the c.eval section."""
  options = {}
  if eval_config is not None:
    options = dict(distance=eval_config.distance, rerank=eval_config.rerank,
                   query_block=eval_config.query_block)
  if "remove_junk" in overrides:
    raise ValueError("protocols: remove_junk is fixed by each dataset's protocol; "
                     "call retrieval.evaluate directly to choose it")
  options.update(overrides)
  return options


def as_features(split: "Features | Mapping[str, np.ndarray]", name: str) -> Features:
  """A split as `retrieval.Features`; dicts need feats, areas, vehicle_id,
  camera_id (as written by the evaluator or stored in a features .npz)."""
  if isinstance(split, Features):
    return split
  missing = [k for k in ("feats", "areas", "vehicle_id", "camera_id")
             if k not in split]
  if missing:
    raise ValueError(f"protocols: split {name!r} lacks {missing}; "
                     f"it has {sorted(split)}")
  return Features(np.asarray(split["feats"], np.float32),
                  np.asarray(split["areas"], np.float32),
                  np.asarray(split["vehicle_id"]), np.asarray(split["camera_id"]),
                  None if "file_name" not in split else np.asarray(split["file_name"]))


def veri776(query: Features, gallery: Features, *, row_name: str = "veri776",
            **options) -> dict[str, dict[str, float]]:
  """VeRi-776: image_query vs image_test, junk = same id and camera."""
  result = retrieval.evaluate(query, gallery, remove_junk=True, **options)
  return {row_name: retrieval.result_row(result)}


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


def vehicle_id(test: Features, *, size: str, trials: int = 10, seed: int = 0,
               **options) -> dict[str, dict[str, float]]:
  """VehicleID test list of one size: random splits (averaged) and first-image."""
  if trials < 1:
    raise ValueError(f"vehicle_id: trials={trials}; expected >= 1")
  rows = []
  for trial in range(trials):
    q, g = vehicleid_random_split(test.ids, seed=seed, trial=trial)
    rows.append(retrieval.result_row(retrieval.evaluate(
        test.take(q), test.take(g), remove_junk=False, **options)))
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  mean["num_queries"] = rows[0]["num_queries"]
  mean["trials"] = trials
  for k in ("mAP", "CMC@1", "CMC@5"):
    mean[f"{k}_std"] = float(np.std([r[k] for r in rows]))
  q, g = vehicleid_first_split(test.ids)
  first = retrieval.result_row(retrieval.evaluate(
      test.take(q), test.take(g), remove_junk=False, **options))
  return {f"vehicleid_{size}/random{trials}": mean, f"vehicleid_{size}/first": first}


def veri_wild(query: Features, gallery: Features, *, size: str,
              **options) -> dict[str, dict[str, float]]:
  """VERI-Wild test set of one size, with and without junk removal."""
  return {
      f"veri_wild_{size}/junk_removed": retrieval.result_row(
          retrieval.evaluate(query, gallery, remove_junk=True, **options)),
      f"veri_wild_{size}/all": retrieval.result_row(
          retrieval.evaluate(query, gallery, remove_junk=False, **options)),
  }


def evaluate_dataset(name: str,
                     splits: Mapping[str, "Features | Mapping[str, np.ndarray]"],
                     eval_config: ml_collections.ConfigDict | None = None, *,
                     builder_config: str = "",
                     **overrides) -> dict[str, dict[str, float]]:
  """Runs `name`'s protocol on its extracted splits.

  Args:
    name: veri776 | vehicle_id | veri_wild | synthetic_vehicles.
    splits: {"query", "gallery"} (VehicleID: {"test"}) as Features or dicts.
    eval_config: the c.eval config section (distance, rerank, query_block,
      vehicleid_trials, vehicleid_seed); None for the defaults.
    builder_config: the test size (VehicleID, VERI-Wild row names).
    **overrides: further retrieval.evaluate keywords (e.g. mesh, max_rank).
  """
  if name not in DATASETS:
    raise ValueError(f"protocols: unknown dataset {name!r}; expected one of "
                     f"{DATASETS}")
  options = _options(eval_config, overrides)
  need = ("test",) if name == "vehicle_id" else ("query", "gallery")
  missing = [s for s in need if s not in splits]
  if missing:
    raise ValueError(f"protocols: dataset {name!r} needs splits {list(need)}, "
                     f"missing {missing} (got {sorted(splits)})")
  feats = {s: as_features(splits[s], s) for s in need}
  if name == "vehicle_id":
    trials = 10 if eval_config is None else eval_config.vehicleid_trials
    seed = 0 if eval_config is None else eval_config.vehicleid_seed
    return vehicle_id(feats["test"], size=builder_config or "test",
                      trials=trials, seed=seed, **options)
  if name == "veri_wild":
    return veri_wild(feats["query"], feats["gallery"],
                     size=builder_config or "test", **options)
  return veri776(feats["query"], feats["gallery"], row_name=name, **options)
