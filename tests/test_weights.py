"""torchvision -> Flax weight import: numerical parity, errors, formats, CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import torchvision

from configs import common
from musp_jax import import_weights
from musp_jax.models import build_model
from musp_jax.models import resnet
from musp_jax.models import weights
from musp_jax.training import checkpointing


def torchvision_resnet(depth: int, last_stride: int = 2, *, seed: int = 0,
                       num_classes: int = 1000) -> torch.nn.Module:
  """A random torchvision ResNet in eval mode with non-trivial BatchNorms.

  Fresh BatchNorms are the identity (weight 1, bias 0, mean 0, var 1), which
  would hide a wrong mapping of any of them, so all four are randomised.
  last_stride=1 changes layer4's first block the way re-ID code does.
  """
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f"resnet{depth}")(
      weights=None, num_classes=num_classes)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  if last_stride == 1:
    block = model.layer4[0]
    strided = block.conv2 if hasattr(block, "conv3") else block.conv1
    strided.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
  return model.eval()


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  # Copies: .numpy() shares the tensor's memory, jax on the CPU may keep using it
  # without a copy, and a torch forward in train mode updates BN statistics in place.
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def torch_forward(model: torch.nn.Module, images_nhwc: np.ndarray):
  """(pooled features, logits) of a torchvision ResNet on NHWC numpy input."""
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
  trunk = torch.nn.Sequential(*list(model.children())[:-1])
  with torch.no_grad():
    pooled = trunk(x).flatten(1)
    return pooled.numpy(), model.fc(pooled).numpy()


def abstract_variables(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# torchvision (its own float32 kernels) against the imported Flax ResNet: K u for the
# longest dot product, 9 x 2048 (ResNet-50's layer4) x 2^-24 = 1.1e-3 worst case, a
# random walk far below: 1e-4 of the largest value. Measured at most 7.9e-7 on AVX2 and
# AVX; a transposed kernel or a wrong padding errs by O(1).
TORCH_RTOL = 1e-4


@pytest.mark.parametrize("depth,last_stride,batch", [
    pytest.param(50, 1, 2, marks=pytest.mark.numerics), (50, 2, 1), (18, 1, 2)])
def test_pooled_features_match_torchvision(depth, last_stride, batch):
  torch_model = torchvision_resnet(depth, last_stride, seed=depth + last_stride)
  model = resnet.ResNet(depth, last_stride=last_stride)
  variables = weights.import_resnet(numpy_state_dict(torch_model),
                                    abstract_variables(model), ignore=("fc.",))
  images = np.random.RandomState(depth).randn(batch, 256, 256, 3).astype(
      np.float32)
  out = jax.jit(model.apply)(variables, images)
  expected, _ = torch_forward(torch_model, images)
  size = 16 if last_stride == 1 else 8
  assert out["layer4"].shape == (batch, size, size, 512 if depth == 18 else 2048)
  assert relative_error(out["pooled"], expected) <= TORCH_RTOL


def test_classifier_logits_match_torchvision_on_odd_input_size():
  # Odd sizes catch padding mistakes ('SAME' pads asymmetrically).
  torch_model = torchvision_resnet(18, seed=3, num_classes=10)
  model = resnet.ResNet(18, last_stride=2, num_classes=10)
  variables = weights.import_resnet(numpy_state_dict(torch_model),
                                    abstract_variables(model))
  images = np.random.RandomState(1).randn(2, 67, 45, 3).astype(np.float32)
  out = jax.jit(model.apply)(variables, images)
  pooled, logits = torch_forward(torch_model, images)
  assert relative_error(out["pooled"], pooled) <= TORCH_RTOL
  assert relative_error(out["logits"], logits) <= TORCH_RTOL


@pytest.fixture(scope="module")
def resnet18_state_dict():
  return numpy_state_dict(torchvision_resnet(18, seed=5))


def test_bad_state_dict_names_every_key_with_shapes(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict)
  del state_dict["layer2.0.conv1.weight"]
  state_dict["layer3.1.bn2.running_mean"] = np.zeros(7, np.float32)
  state_dict["extra.weight"] = np.zeros((3, 4), np.float32)
  template = abstract_variables(resnet.ResNet(18))
  with pytest.raises(weights.WeightImportError) as e:
    weights.import_resnet(state_dict, template, ignore=("fc.",))
  msg = str(e.value)
  assert "1 missing key(s)" in msg
  assert ("layer2.0.conv1.weight (expected shape (128, 64, 3, 3), for "
          "params/layer2_0/conv1/kernel)") in msg
  assert "1 mis-shaped key(s)" in msg
  assert ("layer3.1.bn2.running_mean: has shape (7,), expected (256,)") in msg
  assert "1 unexpected key(s)" in msg
  assert "extra.weight (3, 4)" in msg


def test_classifier_is_unexpected_unless_ignored(resnet18_state_dict):
  template = abstract_variables(resnet.ResNet(18))
  with pytest.raises(weights.WeightImportError,
                     match=r"fc\.weight \(1000, 512\)[\s\S]*fc\.bias|"
                           r"fc\.bias \(1000,\)[\s\S]*fc\.weight"):
    weights.import_resnet(resnet18_state_dict, template)
  weights.import_resnet(resnet18_state_dict, template, ignore=("fc.",))


def test_wrong_depth_lists_missing_blocks(resnet18_state_dict):
  template = abstract_variables(resnet.ResNet(34))
  with pytest.raises(weights.WeightImportError) as e:
    weights.import_resnet(resnet18_state_dict, template, ignore=("fc.",))
  assert "layer1.2.conv1.weight (expected shape (64, 64, 3, 3)" in str(e.value)
  assert "layer3.5.bn2.running_var" in str(e.value)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_depth_is_read_from_the_state_dict_layout(depth):
  with torch.device("meta"):  # names only, no memory
    keys = getattr(torchvision.models, f"resnet{depth}")().state_dict()
  assert weights.resnet_depth({k: None for k in keys}) == depth


def test_state_dict_file_formats(tmp_path, resnet18_state_dict):
  tensors = {k: torch.from_numpy(v) for k, v in resnet18_state_dict.items()}
  torch.save(tensors, tmp_path / "plain.pth")
  # Official training checkpoints wrap a DataParallel state dict.
  torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()},
              "epoch": 3}, tmp_path / "wrapped.pth.tar")
  np.savez(tmp_path / "weights.npz", **resnet18_state_dict)
  safetensors.numpy.save_file(resnet18_state_dict,
                              str(tmp_path / "weights.safetensors"))
  for name in ("plain.pth", "wrapped.pth.tar", "weights.npz",
               "weights.safetensors"):
    loaded = weights.load_state_dict(tmp_path / name)
    assert loaded.keys() == resnet18_state_dict.keys(), name
    for k, v in resnet18_state_dict.items():
      np.testing.assert_array_equal(loaded[k], v, err_msg=f"{name}: {k}")


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    weights.load_state_dict(tmp_path / "nope.pth")


def _zeros_like(abstract):
  """Stand-in for freshly initialised variables (values don't matter here)."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def _reid_config(depth: int):
  config = common.get_config().model
  config.depth = depth
  config.num_prototypes = 3
  config.value_channels = 512 if depth in (18, 34) else 2048
  return config


def test_cli_torchvision_roundtrip_then_init_from(tmp_path):
  torch_model = torchvision_resnet(18, last_stride=1, seed=11)
  torch.save(torch_model.state_dict(), tmp_path / "resnet18.pth")
  out_dir = tmp_path / "init"
  import_weights.main(["--torchvision", str(tmp_path / "resnet18.pth"),
                       "--out", str(out_dir)])

  model = build_model(_reid_config(18), num_classes=7)
  fresh = _zeros_like(abstract_variables(model))
  # The one weights format: a workdir whose step 0 the one loader reads.
  restored = checkpointing.load_variables(out_dir)
  assert (restored.step, restored.run.num_classes) == (0, 0)
  assert restored.run.config.model.to_dict() == {"depth": 18, "backbone": "resnet"}
  assert checkpointing.imported_from(out_dir) == {
      "kind": "backbone", "source": str(tmp_path / "resnet18.pth")}
  loaded = checkpointing.initial_variables(fresh, out_dir)
  # The head keeps its fresh initialisation; the backbone is torchvision's.
  for a, b in zip(jax.tree.leaves(loaded["params"]["head"]),
                  jax.tree.leaves(fresh["params"]["head"])):
    np.testing.assert_array_equal(a, b)
  backbone = {col: tree["backbone"] for col, tree in loaded.items()}
  images = np.random.RandomState(2).randn(2, 64, 64, 3).astype(np.float32)
  out = jax.jit(resnet.ResNet(18, last_stride=1).apply)(backbone, images)
  expected, _ = torch_forward(torch_model, images)
  assert relative_error(out["pooled"], expected) <= TORCH_RTOL



def _files(folder):
  return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def test_cli_never_loses_what_is_already_there(tmp_path, resnet18_state_dict, capsys):
  source = tmp_path / "resnet18.pth"
  torch.save({k: torch.from_numpy(v) for k, v in resnet18_state_dict.items()}, source)
  out_dir = tmp_path / "init"
  run = lambda *args: import_weights.main(["--torchvision", *map(str, args)])
  assert run(source, "--out", out_dir) == 0
  written = _files(out_dir)
  capsys.readouterr()

  def error():
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]

  assert run(source, "--out", out_dir) == 1
  assert error() == f"error: {out_dir} exists; pass --overwrite to replace it."
  # A truncated source, a non-ResNet one: named, and the old weights stay.
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(source.read_bytes()[:100_000])
  assert run(truncated, "--out", out_dir, "--overwrite") == 1
  assert error().startswith(
      f"error: {truncated} is not a readable PyTorch file (truncated or another "
      "format?): ")
  other = tmp_path / "other.pth"
  torch.save({"encoder.weight": torch.zeros(3, 3)}, other)
  assert run(other, "--out", out_dir, "--overwrite") == 1
  assert error() == (
      f"error: {other} has basic blocks per stage [0, 0, 0, 0]; no torchvision ResNet "
      "has that layout (expected a ResNet-18/34/50/101/152 state dict)")
  assert _files(out_dir) == written
  # A training workdir is not replaced, even with --overwrite.
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints" / "4").mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  assert run(source, "--out", workdir, "--overwrite") == 1
  assert error() == (
      f"error: {workdir} exists and is not a folder written by import_weights; refusing "
      "to replace it, even with --overwrite. Choose another output path.")
  assert sorted(p.name for p in workdir.rglob("*")) == ["4", "checkpoints", "config.json"]
  # Its own output is replaced whole; no temporary folder is left behind.
  assert run(source, "--out", out_dir, "--overwrite") == 0
  assert _files(out_dir) != written  # written anew (Orbax names files at random)
  assert checkpointing.imported_from(out_dir)["source"] == str(source)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "init", "other.pth", "resnet18.pth", "truncated.pth", "workdir"]


def test_init_from_names_mismatched_arrays_and_fields(tmp_path, resnet18_state_dict):
  backbone = weights.import_resnet(
      resnet18_state_dict, abstract_variables(resnet.ResNet(18)),
      ignore=("fc.",))
  checkpointing.save_imported(tmp_path / "r18",
                              {col: {"backbone": t} for col, t in backbone.items()},
                              model={"depth": 18}, num_classes=0, source={"kind": "backbone"})
  for depth, problem in (
      (34, "missing in checkpoint: params/backbone/layer1_2/conv1/kernel (3, 3, 64, 64)"),
      (50, "shape of params/backbone/layer1_0/conv1/kernel: checkpoint (3, 3, 64, 64), "
           "model (1, 1, 64, 64)")):
    config = _reid_config(depth)
    model = build_model(config, num_classes=7)
    with pytest.raises(checkpointing.CheckpointMismatchError) as e:
      checkpointing.initial_variables(_zeros_like(abstract_variables(model)),
                                      tmp_path / "r18", model_config=config)
    assert f"(model.depth: checkpoint has 18, config asks {depth})" in str(e.value)
    assert problem in str(e.value)


def test_init_from_needs_a_checkpoint_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="import_weights"):
    checkpointing.initial_variables({}, tmp_path / "missing")
