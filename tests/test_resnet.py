"""ResNet backbone: layout, shapes, dtypes, BatchNorm statistics against
PyTorch (forward parity: test_weights.py)."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
import numpy as np
import pytest
import torch
import torchvision

from musp_jax.models import resnet
from musp_jax.models import weights


def _abstract_init(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet50_with_fc_has_torchvisions_parameter_count():
  variables = _abstract_init(resnet.ResNet(50, num_classes=1000))
  torch_count = sum(p.numel() for p in
                    torchvision.models.resnet50(weights=None).parameters())
  assert _count(variables["params"]) == torch_count == 25_557_032


@pytest.mark.parametrize("depth,last_stride", [
    (18, 1), (18, 2), (34, 1), (50, 1), (50, 2), (101, 1), (152, 1)])
def test_output_shapes_every_depth(depth, last_stride):
  model = resnet.ResNet(depth, last_stride=last_stride)
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0),
                                     jnp.zeros((2, 64, 96, 3))))[0]
  width = 512 if depth in (18, 34) else 2048
  assert out["stem"].shape == (2, 16, 24, 64)
  assert out["layer1"].shape[1:3] == (16, 24)
  assert out["layer3"].shape[1:3] == (4, 6)
  final = (4, 6) if last_stride == 1 else (2, 3)
  assert out["layer4"].shape == (2, *final, width)
  assert out["pooled"].shape == (2, width)
  assert "logits" not in out


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_parameter_tree_matches_torchvision_shapes(depth):
  """Every torchvision tensor has a Flax leaf of the transposed shape."""
  variables = _abstract_init(resnet.ResNet(depth, num_classes=1000))
  flat = {"/".join(k): shape for k, shape in _flatten(variables).items()}
  torch_model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
  expected = {}
  for name, tensor in torch_model.state_dict().items():
    if name.endswith("num_batches_tracked"):
      continue
    *mods, leaf = name.split(".")
    path = _flax_module_path(mods)
    if leaf == "weight" and tensor.ndim == 4:
      expected["params/" + path + "/kernel"] = tuple(tensor.permute(2, 3, 1, 0).shape)
    elif leaf == "weight" and tensor.ndim == 2:
      expected["params/" + path + "/kernel"] = tuple(tensor.T.shape)
    elif leaf == "weight":
      expected["params/" + path + "/scale"] = tuple(tensor.shape)
    elif leaf == "bias":
      expected["params/" + path + "/bias"] = tuple(tensor.shape)
    else:
      stat = {"running_mean": "mean", "running_var": "var"}[leaf]
      expected["batch_stats/" + path + "/" + stat] = tuple(tensor.shape)
  assert flat == expected


def _flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(v.shape)
  return out


def _flax_module_path(torch_modules):
  """torchvision module path -> our Flax module path (written from the docs)."""
  if torch_modules[0].startswith("layer"):
    block = f"{torch_modules[0]}_{torch_modules[1]}"
    rest = torch_modules[2:]
    if rest[0] == "downsample":
      rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
    return "/".join([block] + rest)
  return "/".join(torch_modules)


def test_parameters_and_statistics_stay_float32_under_bfloat16():
  variables = _abstract_init(resnet.ResNet(18, dtype=jnp.bfloat16))
  dtypes = {x.dtype for x in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.fixture(scope="module")
def resnet18_variables():
  """Random torchvision weights: cheaper than a JAX init on a busy CPU."""
  torch.manual_seed(0)
  state_dict = {k: v.numpy() for k, v in
                torchvision.models.resnet18(weights=None).state_dict().items()}
  return weights.import_resnet(state_dict, _abstract_init(resnet.ResNet(18)),
                               ignore=("fc.",))


@pytest.mark.numerics
def test_bfloat16_forward_close_to_float32(resnet18_variables):
  images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  variables = resnet18_variables
  ref = jax.jit(resnet.ResNet(18).apply)(variables, images)
  out = jax.jit(resnet.ResNet(18, dtype=jnp.bfloat16).apply)(variables, images)
  assert out["layer4"].dtype == jnp.bfloat16
  assert out["pooled"].dtype == jnp.float32
  err = np.linalg.norm(out["pooled"] - ref["pooled"]) / np.linalg.norm(
      ref["pooled"])
  # bfloat16 keeps 8 significant bits (2^-9 = 2e-3 a rounding); over ResNet-18's ~20
  # layers the roundings random-walk to sqrt(20) x 2e-3 = 9e-3: 2e-2.
  assert err <= 2e-2
  assert err > 0  # it really computed in bfloat16


def test_train_mode_updates_batch_statistics_with_torch_momentum(
    resnet18_variables):
  images = np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)
  model = resnet.ResNet(18)
  variables = resnet18_variables
  _, updated = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, images)
  # The stem BN sees conv1's output; PyTorch momentum 0.1 moves the running
  # mean 10% of the way from 0 to the batch mean.
  stem = jax.lax.conv_general_dilated(
      images, variables["params"]["conv1"]["kernel"], (2, 2),
      ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # float32 means over 4 x 16 x 16 = 1024 values of a K = 147 conv, in two programs:
  # 1024 u = 6e-5 worst case, hence rtol=1e-4. Measured equal on AVX2 and AVX.
  np.testing.assert_allclose(updated["batch_stats"]["bn1"]["mean"],
                             0.1 * np.mean(stem, axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_rejects_unknown_depth():
  with pytest.raises(ValueError, match="depth 42"):
    _abstract_init(resnet.ResNet(42))


def _relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _bn_steps(shape, dtype, steps=4, *, shard=None, seed=0):
  """Train-mode steps of our BatchNorm and torch's on the same inputs.

  Returns (our variables, our last output, torch module, torch's last output
  as NHWC/NC).
  """
  channels = shape[-1]
  bn = resnet.batch_norm(True, dtype, "bn")
  variables = bn.init(jax.random.key(0), jnp.zeros(shape, dtype))
  torch_bn = (torch.nn.BatchNorm1d if len(shape) == 2 else
              torch.nn.BatchNorm2d)(channels, momentum=0.1)
  step = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))
  rng = np.random.RandomState(seed)
  for i in range(steps):
    # Shifted and scaled per step so the running statistics keep moving.
    x = (rng.randn(*shape) * (1 + 0.5 * i) + i - 1).astype(np.float32)
    x = np.array(jnp.asarray(x, dtype), np.float32)  # both see the same values
    x_in = jnp.asarray(x, dtype)
    if shard is not None:
      x_in = jax.device_put(x_in, shard)
      assert len(x_in.sharding.device_set) == 8
    y, updated = step(variables, x_in)
    variables = {**variables, **updated}
    t = torch.from_numpy(x)
    t = t.permute(0, 3, 1, 2) if len(shape) == 4 else t
    with torch.no_grad():
      ty = torch_bn(t)
  ty = ty.permute(0, 2, 3, 1) if len(shape) == 4 else ty
  return variables, y, torch_bn, ty.numpy()


@pytest.mark.parametrize("shape,dtype", [
    ((6, 5), jnp.float32),  # BatchNorm1d (BNNeck): n = batch = 6
    # BatchNorm2d: n = 4 * 5 * 3 = 60
    pytest.param((4, 5, 3, 7), jnp.float32, marks=pytest.mark.numerics),
    # bf16 compute, float32 statistics
    pytest.param((4, 5, 3, 7), jnp.bfloat16, marks=pytest.mark.numerics),
])
def test_batch_norm_running_statistics_match_torch(shape, dtype):
  """Running variance moves towards the unbiased batch variance (n / (n-1)),
  the normalisation uses the biased one, as torch.nn.BatchNorm{1,2}d."""
  variables, y, torch_bn, ty = _bn_steps(shape, dtype)
  stats = variables["batch_stats"]
  # Running statistics: a few momentum updates of means / variances of at most 60
  # values, both in float32; measured 2.2e-7 (AVX2 and AVX). The output: one
  # normalisation (a few roundings, 1e-5) or bfloat16's 8 bits (2^-9 = 2e-3: 1e-2;
  # measured 2.5e-3).
  assert _relative_error(stats["mean"], torch_bn.running_mean) <= 1e-6
  assert _relative_error(stats["var"], torch_bn.running_var) <= 1e-6
  assert {x.dtype for x in jax.tree.leaves(variables)} == {
      jnp.dtype(jnp.float32)}
  assert y.dtype == dtype
  # The output is normalised with the biased variance (bf16 output: 8 bits).
  assert _relative_error(y, ty) <= (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.numerics
def test_batch_norm_counts_the_global_batch_when_sharded():
  """8 devices x 2 rows: the correction is 16/15 (global), not 2/1."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  shard = NamedSharding(mesh, PartitionSpec("data"))
  variables, _, torch_bn, _ = _bn_steps((16, 5), jnp.float32, shard=shard)
  stats = variables["batch_stats"]
  # As above (the sharded sums of 16 values); measured 2.2e-7.
  assert _relative_error(stats["mean"], torch_bn.running_mean) <= 1e-6
  assert _relative_error(stats["var"], torch_bn.running_var) <= 1e-6


def test_batch_norm_needs_two_values_per_channel_in_training():
  bn = resnet.batch_norm(True, jnp.float32, "neck")
  variables = bn.init(jax.random.key(0), jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match="'neck'.*more than one value per "
                                       r"channel; input shape \(1, 3\)"):
    bn.apply(variables, jnp.ones((1, 3)), mutable=["batch_stats"])
  # Evaluation (running statistics) takes a single image.
  resnet.batch_norm(False, jnp.float32, "neck").apply(variables,
                                                      jnp.ones((1, 3)))


@pytest.mark.numerics
def test_train_mode_statistics_match_torchvision_after_steps():
  """Every running mean/var of a ResNet-18 after 3 train-mode steps."""
  torch.manual_seed(1)
  torch_model = torchvision.models.resnet18(weights=None).train()
  model = resnet.ResNet(18, last_stride=2)  # torchvision's
  template = _abstract_init(model, (1, 32, 32, 3))
  variables = weights.import_resnet(
      {k: v.numpy().copy() for k, v in torch_model.state_dict().items()},
      template, ignore=("fc.",))
  step = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                          mutable=["batch_stats"]))
  rng = np.random.RandomState(1)
  for _ in range(3):
    # layer4 is 1x1 here: its BatchNorms reduce only n = 4 values.
    images = rng.randn(4, 32, 32, 3).astype(np.float32)
    _, updated = step(variables, images)
    variables = {**variables, **updated}
    with torch.no_grad():
      torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))
  expected = weights.import_resnet(
      {k: v.numpy() for k, v in torch_model.state_dict().items()},
      template, ignore=("fc.",))["batch_stats"]
  errors = jax.tree.map(_relative_error, variables["batch_stats"], expected)
  # Statistics of a whole ResNet-18 (torch's convolutions against XLA's, K up to
  # 4608): each layer's float32 rounding feeds the next; measured 2.4e-6 on AVX2 and
  # AVX, the bound 1e-5 (README quotes 2.8e-6).
  assert max(jax.tree.leaves(errors)) <= 1e-5, errors
