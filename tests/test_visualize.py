"""python -m musp_jax.visualize: each command end to end, and its errors."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

import tools_fixtures
from musp_jax import visualize
from musp_jax.training import model_pictures


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


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
  fig = model_pictures.attention_grid(loaded.model, loaded.variables, loaded.config, images)
  titles = [[ax.get_title() for ax in row] for row in
            np.asarray(fig.axes).reshape(3, n + 1)]
  for row in titles:
    assert row[0] == "image"
    assert [t.split()[0] for t in row[1:]] == ["part"] * (n - 1) + ["background"]
    shares = [float(t.split()[-1].rstrip("%")) for t in row[1:]]
    # Softmax maps share the image; each title rounds its percent (by <= 0.5).
    assert sum(shares) == pytest.approx(100, abs=n)


def test_ranks_command(tmp_path, loaded, capsys):
  data_dir = tools_fixtures.shared_data_dir()
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
  assert rc == 1 and "No images in folder" in capsys.readouterr().err
  baseline = tools_fixtures.make_workdir(tmp_path / "baseline", head="baseline")
  rc = visualize.main(["attention", "--workdir", str(baseline),
                       "--images", str(tmp_path)])
  assert rc == 1 and "no attention maps" in capsys.readouterr().err
  with pytest.raises(ValueError, match="out of range"):
    model_pictures.ranks_picture(
        loaded.with_overrides(data_dir=tools_fixtures.shared_data_dir()),
        str(tmp_path), queries=[10_000])
