"""Round trip of the exported inference function (jax.export)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import tools_fixtures
from musp_jax import embed
from musp_jax import export
from musp_jax import inference


@pytest.fixture(scope="module")
def loaded():
  return tools_fixtures.shared_model()


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "model.npz"
  rc = export.main(["--workdir", str(tools_fixtures.shared_workdir()), "--out", str(out),
                    "--input_size", "48", "80"])
  assert rc == 0
  return out


def _images(n, hw, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_round_trip_gives_identical_outputs(exported_file, loaded):
  model = export.load(str(exported_file))
  assert model.input_hw == (48, 80)
  assert model.signature == loaded.signature
  assert set(model.metadata["platforms"]) == {"cpu", "cuda"}
  direct = jax.jit(export.serving_fn(loaded.model, loaded.variables, loaded.config,
                                     input_hw=(48, 80)))
  n = loaded.config.model.num_prototypes
  for batch in (1, 3):  # the batch dimension is symbolic
    x = _images(batch, (48, 80), seed=batch)
    out = model(x)
    assert out["feats"].shape == (batch, n, 512) and out["areas"].shape == (batch, n)
    ref = direct(x)
    np.testing.assert_array_equal(out["feats"], np.asarray(ref["feats"]))
    np.testing.assert_array_equal(out["areas"], np.asarray(ref["areas"]))
    np.testing.assert_allclose(np.linalg.norm(out["feats"], axis=-1), 1.0, rtol=1e-5)


def test_export_at_model_size_matches_embed(tmp_path, loaded):
  """At the model's input size there is no resize: the export equals the embed tool."""
  serialized, metadata = export.export(loaded, platforms=("cpu",))
  export.save(str(tmp_path / "m.npz"), serialized, metadata)
  model = export.load(str(tmp_path / "m.npz"))
  paths = tools_fixtures.write_images(tmp_path / "imgs", 2, seed=5)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  resized = []
  for i, p in enumerate(paths):  # already at the model's size, so embed does not resize
    img = Image.open(p).convert("RGB").resize(loaded.image_size[::-1])
    img.save(tmp_path / f"r{i}.png")
    resized.append(np.asarray(img))
  feats = embed.embed(loaded, [str(tmp_path / "r0.png"), str(tmp_path / "r1.png")],
                      str(tmp_path / "f.npz"), progress=False)
  out = model(np.stack(resized))
  np.testing.assert_allclose(out["feats"], feats.feats, atol=2e-5)
  np.testing.assert_allclose(out["areas"], feats.areas, atol=1e-6)


def test_loading_needs_no_model_code(exported_file):
  code = f"""
import sys, json
import numpy as np
from musp_jax import export
model = export.load({str(exported_file)!r})
out = model(np.zeros((2, 48, 80, 3), np.uint8))
loaded = sorted(m for m in sys.modules if m.startswith(("musp_jax.models", "flax", "musp_jax.inference")))
print(json.dumps({{"shape": list(out["feats"].shape), "modules": loaded}}))
"""
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=env, cwd=str(pathlib.Path(__file__).parents[1]), check=False)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["shape"][0] == 2
  assert result["modules"] == []


def test_bad_inputs_are_clear_errors(exported_file, tmp_path):
  model = export.load(str(exported_file))
  with pytest.raises(ValueError, match=r"uint8 images \(N, 48, 80, 3\)"):
    model(np.zeros((1, 64, 64, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    model(np.zeros((1, 48, 80, 3), np.float32))
  np.savez(tmp_path / "feats.npz", feats=np.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match="not a musp_jax export"):
    export.load(str(tmp_path / "feats.npz"))
