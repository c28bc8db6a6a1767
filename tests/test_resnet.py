"""ResNet backbone: layout, shapes, dtypes (numerical parity: test_weights.py)."""

import jax
import jax.numpy as jnp
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


def test_bfloat16_forward_close_to_float32(resnet18_variables):
  images = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  variables = resnet18_variables
  ref = jax.jit(resnet.ResNet(18).apply)(variables, images)
  out = jax.jit(resnet.ResNet(18, dtype=jnp.bfloat16).apply)(variables, images)
  assert out["layer4"].dtype == jnp.bfloat16
  assert out["pooled"].dtype == jnp.float32
  err = np.linalg.norm(out["pooled"] - ref["pooled"]) / np.linalg.norm(
      ref["pooled"])
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
  np.testing.assert_allclose(updated["batch_stats"]["bn1"]["mean"],
                             0.1 * np.mean(stem, axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-6)


def test_rejects_unknown_depth():
  with pytest.raises(ValueError, match="depth 42"):
    _abstract_init(resnet.ResNet(42))
