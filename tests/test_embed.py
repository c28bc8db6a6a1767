"""End-to-end tests of `python -m musp_jax.embed` on a random-weight ResNet-18."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import tools_fixtures
from musp_jax.data import augment
from musp_jax import embed
from musp_jax.serving import inference


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


def _reference_features(loaded, path):
  """Test transform + normalisation + model + per-branch L2 norm, written out independently."""
  data = pathlib.Path(path).read_bytes()
  assert loaded.config.input.normalize == "half"
  pixels = augment.TestTransform.from_config(loaded.config.input)(data)[None]
  # (v / 255 - 0.5) / 0.5 in XLA's float32 order (a divide by a constant is a multiply by
  # its reciprocal): a 1-ulp difference in the input moves random-weight features ~4e-5.
  x = (pixels.astype(np.float32) - 127.5) * np.float32(1 / 127.5)
  out = loaded.model.apply(loaded.variables, x, train=False)
  feats = np.asarray(out["feats"], np.float64)[0]
  norms = np.linalg.norm(feats, axis=-1, keepdims=True)
  return feats / np.maximum(norms, 1e-12), np.asarray(out["areas"])[0]


def test_embed_folder_end_to_end(tmp_path, loaded, capsys):
  paths = tools_fixtures.write_images(tmp_path / "imgs", 5)
  (tmp_path / "imgs" / "notes.txt").write_text("not an image; skipped in a folder")
  out = tmp_path / "feats.npz"
  rc = embed.main(["--workdir", str(tools_fixtures.shared_workdir()),
                   "--images", str(tmp_path / "imgs"), "--out", str(out),
                   "--batch_size", "2"])
  assert rc == 0
  assert "5 images" in capsys.readouterr().out
  with np.load(out) as data:
    for key in ("feats", "areas", "vehicle_id", "camera_id", "file_name",
                "model_signature", "model_source"):
      assert key in data.files
    feats, areas = data["feats"], data["areas"]
    n = loaded.config.model.num_prototypes
    assert feats.shape == (5, n, 512)  # n-1 parts + global, ResNet-18 width
    assert areas.shape == (5, n)
    # float32 norms of 512 values and sums of n - 1 areas: their rounding random-walks
    # to sqrt(512) u = 1.4e-6; measured 1.2e-7 (AVX2, AVX). The pseudo-area is one
    # float32 rounding of 1/(n-1) (6e-8).
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(areas[:, :-1].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(areas[:, -1], 1.0 / (n - 1), rtol=1e-6)
    assert list(data["file_name"]) == [p.name for p in paths]
    assert (data["vehicle_id"] == -1).all() and (data["camera_id"] == -1).all()
    assert str(data["model_signature"]) == loaded.signature
    assert str(data["model_source"]) == loaded.source
    for i in (0, 4):
      ref_f, ref_a = _reference_features(loaded, paths[i])
      # Batches of 2 against one image: tools_fixtures.NET_OUTPUT_RTOL (measured
      # within 3.6e-6 per element).
      tools_fixtures.assert_net_outputs_close(feats[i], ref_f)
      tools_fixtures.assert_net_outputs_close(areas[i], ref_a)


def test_checkpoint_flag_and_batch_size_give_the_same_features(tmp_path, loaded):
  paths = tools_fixtures.write_images(tmp_path, 3, seed=1, suffix=".jpg")
  a = embed.write_features(loaded, [str(p) for p in paths], str(tmp_path / "a.npz"),
                  batch_size=4, progress=False)
  by_checkpoint = inference.load_model(loaded.source)
  assert by_checkpoint.signature == loaded.signature
  b = embed.write_features(by_checkpoint, [str(p) for p in paths], str(tmp_path / "b.npz"),
                  batch_size=1, progress=False)
  # Batches of 4 against batches of 1: tools_fixtures.NET_OUTPUT_RTOL (the former
  # element-wise atol 1e-5 / 1e-6 was half used on AVX: 5.6e-6 / 5.4e-7).
  tools_fixtures.assert_net_outputs_close(a.feats, b.feats)
  tools_fixtures.assert_net_outputs_close(a.areas, b.areas)


def test_flip_averaged_features_do_not_change_when_the_image_is_mirrored(tmp_path, loaded):
  (path,) = tools_fixtures.write_images(tmp_path / "a", 1, seed=2)
  mirrored = tmp_path / "b" / "mirror.png"
  mirrored.parent.mkdir()
  Image.fromarray(np.asarray(Image.open(path))[:, ::-1]).save(mirrored)
  files = inference.list_images([str(path), str(mirrored)])
  flipped = inference.embed_files(loaded, files, flip=True, progress=False)
  plain = inference.embed_files(loaded, files, flip=False, progress=False)
  # The same two forward passes, rows swapped: tools_fixtures.NET_OUTPUT_RTOL.
  tools_fixtures.assert_net_outputs_close(flipped.feats[0], flipped.feats[1])
  assert np.abs(plain.feats[0] - plain.feats[1]).max() > 1e-3  # the model is not symmetric
  assert json.loads(flipped.model_signature)["flip"] is True
  assert json.loads(plain.model_signature)["flip"] is False


def test_folder_without_images_is_a_clear_error(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
  with pytest.raises(FileNotFoundError, match="No images in folder .*empty"):
    inference.list_images([str(tmp_path / "empty")])
  rc = embed.main(["--workdir", str(tools_fixtures.shared_workdir()),
                   "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz")])
  assert rc == 1
  assert "No images in folder" in capsys.readouterr().err
  assert not (tmp_path / "x.npz").exists()


def test_non_image_file_is_a_clear_error(tmp_path, loaded):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"this is text, not a JPEG")
  good = tools_fixtures.write_images(tmp_path, 1)[0]
  with pytest.raises(ValueError, match="broken.jpg is not a readable image"):
    embed.write_features(loaded, [str(good), str(bad)], str(tmp_path / "x.npz"), progress=False)
  with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
    inference.list_images([str(tmp_path / "missing.jpg")])


def test_bad_model_locations_are_clear_errors(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint: expected a workdir"):
    inference.load_model(str(tmp_path))
  rc = embed.main(["--checkpoint", str(tmp_path / "nowhere"), "--images", str(tmp_path),
                   "--out", str(tmp_path / "x.npz")])
  assert rc == 1 and "holds no checkpoint" in capsys.readouterr().err


def test_class_count_and_config_come_from_the_checkpoint(loaded, tmp_path):
  logits = jax.eval_shape(
      lambda v: loaded.model.apply(v, np.zeros((1, 64, 64, 3), np.float32))["logits"],
      loaded.variables)
  assert logits.shape[-1] == 6  # tools_fixtures.make_workdir's num_classes
  # The step folder alone is enough: no config.json, no training data.
  step_dir = pathlib.Path(loaded.source)
  copy = tmp_path / "moved" / "checkpoints" / step_dir.name
  shutil.copytree(step_dir, copy)
  moved = inference.load_model(copy)
  assert moved.signature == loaded.signature
  assert moved.config.to_dict() == loaded.config.to_dict()


def test_output_is_written_whole_or_not_at_all(tmp_path, capsys):
  images = tools_fixtures.write_images(tmp_path / "images", 2)
  (tmp_path / "taken.npz").mkdir()  # a folder where the file would go
  rc = embed.main(["--workdir", str(tools_fixtures.shared_workdir()),
                   "--images", str(images[0]), "--out", str(tmp_path / "taken.npz")])
  assert rc == 1
  assert (f"error: {tmp_path / 'taken.npz'} is a folder; expected a file path to write."
          in capsys.readouterr().err)
  out = tmp_path / "feats.npz"
  assert embed.main(["--workdir", str(tools_fixtures.shared_workdir()),
                     "--images", *map(str, images), "--out", str(out)]) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npz", "images", "taken.npz"]
