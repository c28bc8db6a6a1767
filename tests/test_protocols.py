"""Dataset protocols: split construction and named rows against the reference."""

import numpy as np
import pytest

from configs import common
from musp_jax.retrieval import reference
from musp_jax.retrieval import protocols
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.core import features


def _features(rng, ids, cams, p=2, c=6):
  n = len(ids)
  feats = features.l2_normalize(rng.normal(size=(n, p, c)).astype(np.float32))
  areas = rng.uniform(0.1, 1.0, size=(n, p)).astype(np.float32)
  return saved_features.Features(feats, areas, np.asarray(ids), np.asarray(cams))


def _reference_row(q, g, remove_junk):
  distmat = np.asarray(ranking.pairwise_distance(q.feats, q.areas, g.feats, g.areas))
  r = reference.rank_metrics(distmat, q.ids, g.ids, q.cams, g.cams,
                           remove_junk=remove_junk)
  return {"mAP": r["mAP"], "CMC@1": r["cmc"][0], "CMC@5": r["cmc"][4],
          "CMC@10": r["cmc"][9], "mINP": r["mINP"],
          "num_queries": r["num_valid_queries"]}


def _assert_row(got, want):
  # Both rows rank the same features (no near-ties at float32 rounding) and compute the
  # metrics in float64 from integer ranks: equal up to float64 sums in another order.
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-12), k


IDS = np.array([5, 3, 5, 9, 3, 3, 7, 5, 9, 3])  # id 7 has a single image


def test_vehicleid_random_split_one_per_id_and_deterministic():
  chosen = set()
  for trial in range(30):
    q, g = protocols.vehicleid_random_split(IDS, seed=0, trial=trial)
    again_q, again_g = protocols.vehicleid_random_split(IDS, seed=0, trial=trial)
    np.testing.assert_array_equal(q, again_q)
    np.testing.assert_array_equal(g, again_g)
    assert sorted(IDS[g]) == sorted(set(IDS))  # exactly one image per id
    np.testing.assert_array_equal(np.sort(np.concatenate([q, g])), np.arange(10))
    chosen.update(g.tolist())
  assert chosen == set(range(10))  # every image is sometimes the gallery
  _, g0 = protocols.vehicleid_random_split(IDS, seed=0, trial=0)
  differs = [not np.array_equal(
      g0, protocols.vehicleid_random_split(IDS, seed=s, trial=0)[1]) for s in (1, 2, 3)]
  assert any(differs)


def test_vehicleid_first_split():
  q, g = protocols.vehicleid_first_split(IDS)
  np.testing.assert_array_equal(g, [0, 1, 3, 6])  # first image of 5, 3, 9, 7
  np.testing.assert_array_equal(q, [2, 4, 5, 7, 8, 9])


def test_vehicle_id_rows_average_the_splits():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 12, 60)
  test = _features(rng, ids, np.full(60, -1))
  config = common.get_config().eval
  config.vehicleid_trials = 3
  config.vehicleid_seed = 4
  rows = protocols.vehicle_id({"test": test}, name="vehicle_id_small", eval_config=config)
  assert set(rows) == {"vehicle_id_small/random3", "vehicle_id_small/first"}
  trial_rows = []
  for trial in range(3):
    q, g = protocols.vehicleid_random_split(ids, seed=4, trial=trial)
    trial_rows.append(_reference_row(test.take(q), test.take(g), False))
  mean = {k: np.mean([r[k] for r in trial_rows]) for k in trial_rows[0]}
  _assert_row(rows["vehicle_id_small/random3"], mean)
  q, g = protocols.vehicleid_first_split(ids)
  _assert_row(rows["vehicle_id_small/first"],
              _reference_row(test.take(q), test.take(g), False))


def test_veri_wild_reports_both_rows_and_veri776_removes_junk():
  rng = np.random.default_rng(1)
  query = _features(rng, rng.integers(0, 6, 15), rng.integers(0, 3, 15))
  gallery = _features(rng, rng.integers(0, 6, 40), rng.integers(0, 3, 40))
  splits = {"query": query, "gallery": gallery}
  rows = protocols.veri_wild(splits, name="veri_wild_small")
  assert set(rows) == {"veri_wild_small/junk_removed", "veri_wild_small/all"}
  _assert_row(rows["veri_wild_small/junk_removed"],
              _reference_row(query, gallery, True))
  _assert_row(rows["veri_wild_small/all"], _reference_row(query, gallery, False))
  assert (rows["veri_wild_small/all"]["num_queries"] >=
          rows["veri_wild_small/junk_removed"]["num_queries"])
  rows = protocols.query_gallery(splits, name="veri776")
  _assert_row(rows["veri776"], _reference_row(query, gallery, True))


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="veri776 needs splits \\['query', 'gallery'\\], "
                     "missing \\['gallery'\\]"):
    protocols.query_gallery({"query": {}}, name="veri776")
  with pytest.raises(ValueError, match="remove_junk is fixed"):
    protocols.veri_wild({"query": {}, "gallery": {}}, name="w", remove_junk=False)
  with pytest.raises(TypeError, match="splits \\['query', 'gallery'\\] must be "
                     "saved_features.Features, got \\['dict', 'dict'\\]"):
    protocols.query_gallery({"query": {"feats": np.zeros((1, 1, 1))}, "gallery": {}},
                            name="veri776")


def test_every_dataset_names_a_protocol_that_exists():
  from musp_jax.data import datasets
  from tfds_builders.folder import folder_dataset_builder as folder
  # A user's dataset records its protocol with its build: "" in the table.
  assert {d.protocol or None for d in datasets.DATASETS.values()} - {None} | {
      folder.PROTOCOL, folder.PROTOCOL_KEEP_JUNK} == set(protocols.PROTOCOLS)
  with pytest.raises(ValueError, match="Unknown protocol 'market'"):
    protocols.run_protocol("market", {}, name="m")
