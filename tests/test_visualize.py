"""Tests of the pictures: overlay geometry, rank-list logic, and each command end to end."""

import json
import pathlib

import cv2
import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

import tools_fixtures
from musp_jax import augment
from musp_jax import retrieval
from musp_jax import visualize


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


def test_attention_map_is_resized_to_the_image_geometry():
  map_hxw = np.zeros((4, 8), np.float32)
  map_hxw[1, 5] = 1.0  # cell (1, 5) covers rows 10..19, columns 50..59 of a 40 x 80 image
  up = visualize.resize_map(map_hxw, (40, 80))
  assert up.shape == (40, 80)
  row, col = np.unravel_index(np.argmax(up), up.shape)
  assert 10 <= row < 20 and 50 <= col < 60
  # Half-pixel-centred bilinear: output pixel 14 (centre 14.5) samples the map at
  # (14.5 / 10) - 0.5 = 0.95 rows, 0.05 from the hot cell's centre in each axis.
  # OpenCV interpolates float32 maps in float32 (a few roundings, ~3e-7; no XLA):
  # rtol=1e-5.
  np.testing.assert_allclose(up[14:16, 54:56], 0.95 * 0.95, rtol=1e-5)
  assert up[:5].max() == 0.0 and up[:, :40].max() == 0.0  # far from the cell: nothing
  # Symmetric about the cell's centre (pixel centres aligned, no half-pixel shift).
  np.testing.assert_allclose(up[10:20, 45:65], up[10:20, 45:65][::-1, ::-1],
                             atol=1e-6)  # the same float32 roundings, mirrored


def test_overlay_blends_the_colour_map_at_the_image_size():
  image = np.full((30, 50, 3), 200, np.uint8)
  map_hxw = np.zeros((3, 5), np.float32)
  map_hxw[0, 0] = 1.0
  out = visualize.overlay(image, map_hxw, alpha=0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  cold = np.asarray(colormaps["jet"](0.0)[:3]) * 255
  hot = np.asarray(colormaps["jet"](1.0)[:3]) * 255
  # uint8 pixels: the blend is rounded to an integer (atol=1 grey level).
  np.testing.assert_allclose(out[-1, -1], np.round(0.5 * 200 + 0.5 * cold), atol=1)
  np.testing.assert_allclose(out[4, 4], np.round(0.5 * 200 + 0.5 * hot), atol=1)


def _features(ids, cams):
  n = len(ids)
  return retrieval.Features(np.zeros((n, 1, 2), np.float32), np.ones((n, 1), np.float32),
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
  aps = retrieval.rank_distmat(dist, query.ids, gallery.ids, query.cams, gallery.cams,
                               per_query=True)["per_query"]["AP"]  # what ranks_picture uses
  np.testing.assert_allclose(aps[:3], [0.5, 1.0, 0.2])  # float64 from integer ranks
  assert np.isnan(aps[3])
  assert list(visualize.choose_queries(aps, "worst", 2)) == [2, 0]
  assert list(visualize.choose_queries(aps, "best", 2)) == [1, 0]
  chosen = visualize.choose_queries(aps, "random", 10, seed=1)
  assert sorted(chosen) == [0, 1, 2]
  top, match = visualize.ranked_list(dist[0], 1, 0, gallery, topk=3)
  assert list(top) == [1, 2, 3] and list(match) == [False, True, False]


def test_attention_command_on_image_files(tmp_path, loaded):
  tools_fixtures.write_images(tmp_path / "imgs", 3, seed=7)
  out = tmp_path / "att.png"
  rc = visualize.main(["attention", "--workdir", str(tools_fixtures.shared_workdir()),
                       "--images", str(tmp_path / "imgs"), "--out", str(out)])
  assert rc == 0
  with Image.open(out) as img:
    width, height = img.size
  n = loaded.config.model.num_prototypes
  assert width >= 100 * (n + 1) and height >= 100 * 3  # a readable cell per map and row
  images = [np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((tmp_path / "imgs").iterdir())]
  fig = visualize.attention_grid(loaded.model, loaded.variables, loaded.config, images)
  titles = [[ax.get_title() for ax in row] for row in
            np.asarray(fig.axes).reshape(3, n + 1)]
  for row in titles:
    assert row[0] == "image"
    assert [t.split()[0] for t in row[1:]] == ["part"] * (n - 1) + ["background"]
    shares = [float(t.split()[-1].rstrip("%")) for t in row[1:]]
    # Softmax maps share the image; each title rounds its percent (by <= 0.5).
    assert sum(shares) == pytest.approx(100, abs=n)


def test_attention_beside_the_ground_truth_part_map():
  from tfds_builders.synthetic_vehicles import render  # pylint: disable=g-import-not-at-top
  ident = render.make_identities(0, 2)
  cam = render.make_cameras(0, 1)[0]
  drawn = [render.render(i, cam, render.image_rng(0, 5, j), height=128, view=v)
           for j, (i, v) in enumerate(zip(ident, (render.FRONT, render.SIDE)))]
  # Map 0 takes the top half of every image, the background map the bottom half.
  attention = np.zeros((2, 4, 4, 2), np.float32)
  attention[:, :2, :, 0] = 1.0
  attention[:, 2:, :, 1] = 1.0
  fig = visualize.attention_parts_figure([d.image for d in drawn], [d.mask for d in drawn],
                                         attention, ["a", "b"])
  axes = np.asarray(fig.axes).reshape(2, 4)
  for row, d in zip(axes, drawn):
    top, bottom = d.mask[:64], d.mask[64:]
    assert [ax.get_title() for ax in row[:2]] == ["image", "ground truth"]
    assert row[2].get_title() == (f"part 1  50%\n"
                                  f"{100 * np.mean(top != render.BACKGROUND):.0f}% on vehicle")
    assert row[3].get_title() == (f"background 50%\n"
                                  f"{100 * np.mean(bottom == render.BACKGROUND):.0f}% on backgr.")
    # The ground-truth panel shows the label map in the class colours.
    shown = row[1].get_images()[0].get_array()
    expected = visualize.part_map_image(d.mask)
    np.testing.assert_array_equal(
        shown, cv2.resize(expected, shown.shape[1::-1], interpolation=cv2.INTER_NEAREST))
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend == list(render.PART_CLASSES)


def test_eval_attention_grid_shows_the_first_query_images(loaded):
  """Training writes this grid to TensorBoard at each evaluation."""
  from musp_jax import datasets  # pylint: disable=g-import-not-at-top
  local = visualize.with_overrides(loaded, data_dir=tools_fixtures.shared_data_dir())
  images, names = visualize.eval_images(local.config, 2)
  source = datasets.load_split("synthetic_vehicles", "query",
                               data_dir=tools_fixtures.shared_data_dir(),
                               builder_config=local.config.dataset.builder_config)
  for i, img in enumerate(images):
    np.testing.assert_array_equal(img, augment.decode(source[i]["image"]))
    assert names[i] == source[i]["file_name"]
  two = visualize.eval_attention_grid(local.model, local.variables, local.config,
                                      num_images=2)
  three = visualize.eval_attention_grid(local.model, local.variables, local.config,
                                        num_images=3)
  assert two.dtype == np.uint8 and two.ndim == 3 and two.shape[-1] == 3
  assert three.shape[0] > two.shape[0] and three.shape[1] == two.shape[1]  # one row more


def test_demo_pictures_and_ranks_command(tmp_path, loaded, capsys):
  data_dir = tools_fixtures.shared_data_dir()
  workdir = tools_fixtures.shared_workdir()
  written = visualize.demo_pictures(str(workdir), data_dir=data_dir)
  assert [pathlib.Path(p).name for p in written] == ["attention.png", "attention_parts.png",
                                                      "ranks_worst_top8.png"]
  for p in written:
    with Image.open(p) as img:
      assert img.size[0] > 400 and img.size[1] > 150
  rc = visualize.main(["ranks", "--checkpoint", loaded.source, "--queries", "0", "2",
                       "--topk", "3", "--data_dir", data_dir,
                       "--out_dir", str(tmp_path)])
  assert rc == 0
  (path,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"]
  assert pathlib.Path(path).name == "ranks_chosen_top3.png" and pathlib.Path(path).exists()


def test_bad_inputs_are_clear_errors(tmp_path, loaded, capsys):
  (tmp_path / "empty").mkdir()
  rc = visualize.main(["attention", "--workdir", str(tools_fixtures.shared_workdir()),
                       "--images", str(tmp_path / "empty")])
  assert rc == 2 and "No images in folder" in capsys.readouterr().err
  baseline = tools_fixtures.make_workdir(tmp_path / "baseline", head="baseline")
  rc = visualize.main(["attention", "--workdir", str(baseline),
                       "--images", str(tmp_path)])
  assert rc == 2 and "no attention maps" in capsys.readouterr().err
  with pytest.raises(ValueError, match="out of range"):
    visualize.ranks_picture(
        visualize.with_overrides(loaded, data_dir=tools_fixtures.shared_data_dir()),
        str(tmp_path), queries=[10_000])
