"""A model's pictures on its evaluation data: which queries, which images, what is written."""

import pathlib

import numpy as np
import pytest
from PIL import Image

import tools_fixtures
from musp_jax.data import augment
from musp_jax.retrieval import ranking
from musp_jax.retrieval import saved_features
from musp_jax.training import model_pictures


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


def _features(ids, cams):
  n = len(ids)
  return saved_features.Features(np.zeros((n, 1, 2), np.float32), np.ones((n, 1), np.float32),
                            np.asarray(ids), np.asarray(cams))


def test_per_query_ap_and_choice_of_queries():
  gallery = _features([1, 2, 1, 3, 2], [0, 0, 1, 1, 1])
  query = _features([1, 2, 3, 9], [0, 1, 0, 0])
  dist = np.array([
      [0.0, 0.1, 0.2, 0.3, 0.4],  # id 1 cam 0: gallery 0 is junk; match at rank 2 -> AP 1/2
      [0.5, 0.1, 0.2, 0.3, 0.0],  # id 2 cam 1: 4 junk; match 1 first -> AP 1
      [0.1, 0.2, 0.3, 0.4, 0.0],  # id 3: match 3 is last, rank 5 -> AP 1/5
      [0.0, 0.1, 0.2, 0.3, 0.4],  # id 9: no match -> NaN
  ])
  aps = ranking.rank_distmat(dist, query.ids, gallery.ids, query.cams, gallery.cams,
                               per_query=True)["per_query"]["AP"]  # what ranks_picture uses
  np.testing.assert_allclose(aps[:3], [0.5, 1.0, 0.2])  # float64 from integer ranks
  assert np.isnan(aps[3])
  assert list(model_pictures.choose_queries(aps, "worst", 2)) == [2, 0]
  assert list(model_pictures.choose_queries(aps, "best", 2)) == [1, 0]
  chosen = model_pictures.choose_queries(aps, "random", 10, seed=1)
  assert sorted(chosen) == [0, 1, 2]
  top, match = model_pictures.ranked_list(dist[0], 1, 0, gallery, topk=3)
  assert list(top) == [1, 2, 3] and list(match) == [False, True, False]


def test_eval_attention_grid_shows_the_first_query_images(loaded):
  """Training writes this grid to TensorBoard at each evaluation."""
  from musp_jax.data import datasets
  local = loaded.with_overrides(data_dir=tools_fixtures.shared_data_dir())
  images, names = model_pictures.eval_images(local.config, 2)
  source = datasets.load_split("synthetic_vehicles", "query",
                               data_dir=tools_fixtures.shared_data_dir(),
                               builder_config=local.config.dataset.builder_config)
  for i, img in enumerate(images):
    np.testing.assert_array_equal(img, augment.decode(source[i]["image"]))
    assert names[i] == source[i]["file_name"]
  two = model_pictures.eval_attention_grid(local.model, local.variables, local.config,
                                      num_images=2)
  three = model_pictures.eval_attention_grid(local.model, local.variables, local.config,
                                        num_images=3)
  assert two.dtype == np.uint8 and two.ndim == 3 and two.shape[-1] == 3
  assert three.shape[0] > two.shape[0] and three.shape[1] == two.shape[1]  # one row more


def test_demo_pictures(loaded):
  data_dir = tools_fixtures.shared_data_dir()
  workdir = tools_fixtures.shared_workdir()
  written = model_pictures.demo_pictures(loaded.with_overrides(data_dir=data_dir),
                                         str(workdir / "pictures"))
  assert [pathlib.Path(p).name for p in written] == ["attention.png", "attention_parts.png",
                                                      "ranks_worst_top8.png"]
  for p in written:
    with Image.open(p) as img:
      assert img.size[0] > 400 and img.size[1] > 150
