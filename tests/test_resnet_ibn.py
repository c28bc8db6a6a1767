"""ResNet-IBN-a: parity with a PyTorch restatement, weight import from the IBN-Net and
fast-reid layouts, and the MUSP model built on it."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from configs import common
from musp_jax import import_weights
from musp_jax import models
from musp_jax.models import build_model
from musp_jax.models import resnet
from musp_jax.models import weights
from musp_jax.training import checkpointing

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class TorchIBN(torch.nn.Module):
  """IBN-a's split norm as the IBN-Net paper describes it: instance norm (affine, no
  running statistics) on the first int(0.5 * planes) channels, batch norm on the rest."""

  def __init__(self, planes: int):
    super().__init__()
    self.half = int(planes * 0.5)
    self.IN = torch.nn.InstanceNorm2d(self.half, affine=True)
    self.BN = torch.nn.BatchNorm2d(planes - self.half)

  def forward(self, x):
    first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
    return torch.cat([self.IN(first), self.BN(rest)], dim=1)


def torch_resnet_ibn_a(depth: int, *, last_stride: int = 1, seed: int = 0,
                       device: str = "cpu") -> torch.nn.Module:
  """torchvision's ResNet with bn1 of every block of layers 1-3 made IBN-a, random
  weights, every norm's parameters and statistics randomised (fresh ones are the
  identity and would hide a wrong mapping). Its state dict has IBN-Net's names."""
  torch.manual_seed(seed)
  with torch.device(device):
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    for layer in (model.layer1, model.layer2, model.layer3):
      for block in layer:
        block.bn1 = TorchIBN(block.bn1.num_features)
  if device == "meta":
    return model
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  if last_stride == 1:
    block = model.layer4[0]
    (block.conv2 if hasattr(block, "conv3") else block.conv1).stride = (1, 1)
    block.downsample[0].stride = (1, 1)
  return model


def torch_stages(model: torch.nn.Module, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  """The output of every stage (NHWC), in the model's own precision and mode."""
  dtype = next(model.parameters()).dtype
  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).to(dtype)
  out = {}
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out["stem"] = x
    for stage in STAGES[1:]:
      x = getattr(model, stage)(x)
      out[stage] = x
  return {k: v.permute(0, 2, 3, 1).double().numpy() for k, v in out.items()}


def numpy_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
  # Copies: a train-mode forward updates the statistics in place.
  return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def relative_l2(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, prefix + (k,)) if hasattr(v, "items") else {prefix + (k,): v})
  return out


@pytest.fixture(scope="module")
def reference():
  """A random ResNet-50-IBN-a (last stride 1), its weights, and images."""
  model = torch_resnet_ibn_a(50, seed=1)
  images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  return model, numpy_state_dict(model), images


def _template(depth=50, shape=(1, 64, 64, 3)):
  net = resnet.ResNet(depth, backbone="resnet_ibn_a")
  return jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape)))


# The bound: our float32 forward is compared with the restatement run in float64 (the
# exact result for this purpose), and must be within SPREAD x the restatement's own
# float32 error against it, stage by stage. Both are float32 evaluations of the same
# sums (convolutions of up to 3 x 3 x 512 = 4,608 terms, then normalisations that
# rescale any error with the signal) in different orders and blockings (XLA's or our
# GEMM path against oneDNN), so each error is a rounding walk of the same size: their
# ratio measured 0.82-1.23 (every stage and running statistic, train and eval mode,
# both conv paths, on AVX2 and with XLA_FLAGS=--xla_cpu_max_isa=AVX). SPREAD = 3 leaves
# room for other blockings; a mapping mistake is far outside it (an instance-norm eps
# of 1e-6 for 1e-5 moves layer1 by 4.5e-5 relative, 60x its float32 spread of 7e-7).
SPREAD = 3.0


# Each conv path once, and each mode once: the CPU's default (GEMM) path in train mode,
# which checks the running statistics too, and XLA's convolutions (other backends) in
# eval mode, which normalises with the imported running statistics. The first is the
# representative the second-instruction-set pass (.ci/run, -m numerics) runs again.
@pytest.mark.parametrize("conv_impl,train", [
    pytest.param("gemm", True, marks=pytest.mark.numerics), ("xla", False)])
def test_every_stage_matches_the_pytorch_restatement(reference, conv_impl, train):
  model32, state_dict, images = reference
  model32 = copy.deepcopy(model32).train(train)
  model64 = copy.deepcopy(model32).double()
  want = torch_stages(model64, images)
  spread = {k: relative_l2(v, want[k]) for k, v in torch_stages(model32, images).items()}
  net = resnet.ResNet(50, last_stride=1, conv_impl=conv_impl, backbone="resnet_ibn_a")
  variables = weights.import_resnet(state_dict, _template(), ignore=("fc.",))
  fn = jax.jit(lambda v, x: net.apply(v, x, train=train, mutable=["batch_stats"]))
  out, updated = fn(variables, images)
  for stage in STAGES:
    err = relative_l2(out[stage], want[stage])
    assert err <= SPREAD * spread[stage], (stage, err, spread[stage])
  if not train:
    return
  # The running statistics the step left, against those of the restatement's forward
  # (PyTorch: momentum 0.1, unbiased running variance), with the same bound; a float32
  # number's own rounding (eps32) is the floor for statistics the float32 restatement
  # happens to get exact.
  stats = {"params": {}, "batch_stats": updated["batch_stats"]}
  ours = {torch_name(k): v for k, v in _flat(stats).items()}
  s64, s32 = model64.state_dict(), model32.state_dict()
  assert ours.keys() == {k for k in s64 if k.endswith(("running_mean", "running_var"))}
  eps32 = float(np.finfo(np.float32).eps)
  for name, value in ours.items():
    spread = max(relative_l2(s32[name].numpy(), s64[name].numpy()), eps32)
    assert relative_l2(value, s64[name].numpy()) <= SPREAD * spread, name


def torch_name(path: tuple[str, ...]) -> str:
  """Our variable path -> its IBN-Net / torchvision state-dict name."""
  collection, *modules, leaf = path
  del collection
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
                "mean": "running_mean", "var": "running_var"}[leaf]
  names = [m.replace("_", ".") if m.startswith("layer") else
           {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(m, m)
           for m in modules]
  return ".".join(names + [torch_leaf])


def test_parameter_tree_has_ibn_nets_names_every_depth():
  """Each IBN-Net tensor of ResNet-50/101-IBN-a has a leaf of ours, and nothing else."""
  for depth in (50, 101):
    with torch.device("meta"):
      keys = torch_resnet_ibn_a(depth, device="meta").state_dict()
    names = {k: tuple(v.shape) for k, v in keys.items() if not k.startswith("fc.")
             and not k.endswith("num_batches_tracked")}
    ours = {torch_name(path): tuple(v.shape[i] for i in (3, 2, 0, 1)) if v.ndim == 4
            else tuple(v.shape) for path, v in _flat(_template(depth)).items()}
    assert ours == names
    assert sum(k.endswith(".IN.weight") for k in ours) == sum(
        resnet.STAGE_SIZES[depth][1][:3])


def test_imports_ibn_net_and_fast_reid_files_alike(tmp_path):
  # ResNet-18-IBN-a (IBN-Net has it too): the names are those of every depth, the
  # files 4x smaller.
  state_dict = numpy_state_dict(torch_resnet_ibn_a(18, seed=2))
  ibn_net = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  ibn_net["fc.weight"], ibn_net["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
  torch.save(ibn_net, tmp_path / "resnet50_ibn_a.pth")
  # fast-reid: {"model": backbone.* beside its heads and pixel statistics}; some older
  # instance norms carried running statistics, which IBN-a never reads.
  fast_reid = {f"backbone.{k}": v for k, v in ibn_net.items() if not k.startswith("fc.")}
  fast_reid["backbone.layer1.0.bn1.IN.running_mean"] = torch.zeros(32)
  fast_reid.update({"heads.bottleneck.0.weight": torch.ones(512),
                    "pixel_mean": torch.zeros(1, 3, 1, 1)})
  torch.save({"model": fast_reid, "iteration": 7}, tmp_path / "model_final.pth")
  outs = []
  for name in ("resnet50_ibn_a.pth", "model_final.pth"):
    out = tmp_path / f"weights_{name}"
    assert import_weights.main(["--ibn", str(tmp_path / name), "--out", str(out)]) == 0
    model = checkpointing.load_variables(out).run.config.model
    assert (model.backbone, model.depth) == ("resnet_ibn_a", 18)
    outs.append(out)
  config = common.get_config()
  config.model.backbone, config.model.depth = "resnet_ibn_a", 18
  model_vars = jax.eval_shape(lambda: build_model(config.model, 5).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  direct = weights.import_resnet(state_dict, _template(18), ignore=("fc.",))
  for out in outs:
    loaded = checkpointing.initial_variables(model_vars, out)
    for col in ("params", "batch_stats"):
      got, want = _flat(loaded[col]["backbone"]), _flat(direct[col])
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_each_import_flag_refuses_the_other_layout(tmp_path, capsys):
  plain = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None)
           .state_dict().items()}
  np.savez(tmp_path / "r18.npz", **plain)
  ibn = numpy_state_dict(torch_resnet_ibn_a(18))
  np.savez(tmp_path / "r18_ibn.npz", **ibn)
  assert import_weights.main(["--ibn", str(tmp_path / "r18.npz"),
                              "--out", str(tmp_path / "a")]) == 1
  assert ("has no 'layer1.0.bn1.IN.weight' (nor 'backbone.layer1.0.bn1.IN.weight'): "
          "it is not a ResNet-IBN-a state dict; a torchvision ResNet imports with "
          "--torchvision") in capsys.readouterr().err
  assert import_weights.main(["--torchvision", str(tmp_path / "r18_ibn.npz"),
                              "--out", str(tmp_path / "b")]) == 1
  assert ("is a ResNet-IBN-a state dict (layer1.0.bn1.IN.weight); import it with --ibn"
          in capsys.readouterr().err)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_musp_head_on_ibn_a_and_checkpoints_record_the_backbone():
  config = common.get_config()
  config.model.backbone = "resnet_ibn_a"
  model = build_model(config.model, 7)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False))[0]
  plain = build_model(common.get_config().model, 7)
  same = jax.eval_shape(lambda: plain.init_with_output(
      jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False))[0]
  assert jax.tree.map(lambda x: x.shape, out) == jax.tree.map(lambda x: x.shape, same)
  assert "backbone" in models.ARCH_FIELDS
  # A checkpoint of one backbone is refused for the other, the field named; a config
  # written before the field existed meant the torchvision ResNet.
  old = common.get_config().model.to_dict()
  del old["backbone"]
  checkpointing.check_model_config(old, common.get_config().model, where="w")
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match="model.backbone: checkpoint has 'resnet', config asks "
                           "'resnet_ibn_a'"):
    checkpointing.check_model_config(old, config.model, where="w")
