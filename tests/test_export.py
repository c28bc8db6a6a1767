"""Round trip of the exported inference function (jax.export)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import onnxruntime
import pytest

import tools_fixtures
from musp_jax import embed
from musp_jax import export
from musp_jax.serving import inference


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
    # float32 norms of 512 values: sqrt(512) u = 1.4e-6 random walk; measured 6e-8.
    np.testing.assert_allclose(np.linalg.norm(out["feats"], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.numerics
def test_export_at_model_size_matches_embed(tmp_path, loaded):
  """At the model's input size there is no resize: the export equals the embed tool."""
  serialized, metadata = export.export(loaded, platforms=("cpu",))
  export.write_npz(str(tmp_path / "m.npz"), serialized, metadata)
  model = export.load(str(tmp_path / "m.npz"))
  paths = tools_fixtures.write_images(tmp_path / "imgs", 2, seed=5)
  from PIL import Image
  resized = []
  for i, p in enumerate(paths):  # already at the model's size, so embed does not resize
    img = Image.open(p).convert("RGB").resize(loaded.image_size[::-1])
    img.save(tmp_path / f"r{i}.png")
    resized.append(np.asarray(img))
  feats = embed.write_features(loaded, [str(tmp_path / "r0.png"), str(tmp_path / "r1.png")],
                      str(tmp_path / "f.npz"), progress=False)
  out = model(np.stack(resized))
  # Another program (jax.export) of the same model: tools_fixtures.NET_OUTPUT_RTOL (the
  # former element-wise atol 2e-5 / 1e-6 was 40% used on AVX).
  tools_fixtures.assert_net_outputs_close(out["feats"], feats.feats)
  tools_fixtures.assert_net_outputs_close(out["areas"], feats.areas)


def test_loading_needs_no_model_code(exported_file):
  code = f"""
import sys, json
import numpy as np
from musp_jax import export
model = export.load({str(exported_file)!r})
out = model(np.zeros((2, 48, 80, 3), np.uint8))
loaded = sorted(m for m in sys.modules
                if m.startswith(("musp_jax.models", "flax", "musp_jax.serving.inference")))
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


@pytest.fixture(scope="module")
def baseline_workdir(tmp_path_factory):
  return tools_fixtures.make_workdir(tmp_path_factory.mktemp("baseline") / "workdir",
                                     head="baseline")


def _check_onnx_model(path, loaded, hw, direct):
  """Inputs, outputs and metadata as documented; ONNX == JAX to 1e-4 relative."""
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  (inp,) = session.get_inputs()
  assert (inp.name, inp.type, inp.shape) == ("images", "tensor(uint8)", ["batch", *hw, 3])
  n = loaded.config.model.num_prototypes if loaded.has_attention else 1
  assert {o.name: o.shape for o in session.get_outputs()} == {
      "feats": ["batch", n, 512], "areas": ["batch", n]}
  metadata = json.loads(session.get_modelmeta().custom_metadata_map["musp_jax"])
  assert metadata["format"] == export.ONNX_FORMAT
  assert metadata["model_signature"] == loaded.signature
  x = _images(3, hw, seed=11)
  feats, areas = session.run(["feats", "areas"], {"images": x})
  ref = {k: np.asarray(v) for k, v in direct(x).items()}
  assert feats.shape == (3, n, 512) and areas.shape == (3, n)
  # 1e-4 relative, the bound the export itself enforces before it writes a model
  # (export.py): the difference of each feature vector against its length. Measured
  # here 9.5e-6 (features) and 6.6e-7 (areas), inside NET_OUTPUT_RTOL too.
  rel = np.linalg.norm(feats - ref["feats"], axis=-1) / np.linalg.norm(ref["feats"], axis=-1)
  assert rel.max() < 1e-4, rel.max()
  np.testing.assert_allclose(areas, ref["areas"], rtol=1e-4, atol=0)
  # The batch is dynamic: one image alone gives its row of the batch of three.
  one_feats, one_areas = session.run(["feats", "areas"], {"images": x[1:2]})
  # onnxruntime's own kernels, batch 1 against 3, picked by the CPU's instruction set
  # at run time: tools_fixtures.NET_OUTPUT_RTOL (the former element-wise atol=1e-6 was
  # 91% used on this AVX2 CPU).
  tools_fixtures.assert_net_outputs_close(one_feats[0], feats[1])
  tools_fixtures.assert_net_outputs_close(one_areas[0], areas[1])


def test_onnx_export_of_musp_through_the_resize_path(loaded, tmp_path):
  serialized, metadata = export.export_onnx(loaded, input_hw=(48, 80))
  assert metadata["outputs"] == {"feats": ["batch", "3", "512"], "areas": ["batch", "3"]}
  (tmp_path / "m.onnx").write_bytes(serialized)
  direct = jax.jit(export.serving_fn(loaded.model, loaded.variables, loaded.config,
                                     input_hw=(48, 80)))
  _check_onnx_model(tmp_path / "m.onnx", loaded, (48, 80), direct)


def test_onnx_export_command_on_the_baseline(baseline_workdir, tmp_path, capsys):
  out = tmp_path / "model.onnx"
  out.write_bytes(b"earlier")
  rc = export.main(["--workdir", str(baseline_workdir), "--out", str(out),
                    "--format", "onnx"])
  assert rc == 0
  assert "onnxruntime vs JAX on random images: relative difference" in (
      capsys.readouterr().out)
  loaded = inference.load_model(baseline_workdir)
  direct = jax.jit(export.serving_fn(loaded.model, loaded.variables, loaded.config,
                                     input_hw=loaded.image_size))
  _check_onnx_model(out, loaded, loaded.image_size, direct)


def test_onnx_export_errors(tmp_path):
  workdir = str(tools_fixtures.shared_workdir())
  for extra in (["--out", str(tmp_path / "m.npz")],
                ["--out", str(tmp_path / "m.onnx"), "--platforms", "cpu"]):
    with pytest.raises(SystemExit):
      export.main(["--workdir", workdir, "--format", "onnx", *extra])
