"""GemmConv must equal flax.linen.Conv: parameters, forward and both gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from musp_jax.models import fast_conv

# (kernel, stride, padding, in_channels, out_channels, input size, bias): every
# conv a torchvision ResNet has (stem 7x7/2, 3x3/1, 3x3/2, 1x1/1, strided 1x1
# downsample), stride 2 on even and odd inputs; a non-zero bias as the MUSP
# head's attention conv has.
RESNET_CONVS = [
    (7, 2, 3, 3, 8, 15, False),
    # The 3x3 conv of every block, with a bias: the second-ISA representative.
    pytest.param(3, 1, 1, 8, 8, 9, True, marks=pytest.mark.numerics),
    (3, 2, 1, 8, 16, 10, False),
    (1, 1, 0, 16, 8, 7, True),
    (1, 2, 0, 8, 16, 9, False),
    # Outputs of at most fast_conv.FEW_OUTPUT_PIXELS pixels (summed as matrix products):
    # the last stage at 32 px (2 x 2), a stride-2 conv onto 2 x 2, and onto 1 x 1.
    (3, 1, 1, 8, 8, 2, True),
    (3, 2, 1, 8, 16, 4, False),
    (3, 2, 1, 8, 16, 2, False),
]

# Tolerances: GemmConv and XLA's convolution sum the same products in another order.
# Forward: K = kh kw cin <= 147 terms (the 7x7 stem on 3 channels), K u = 8.8e-6 of the
# sum of |products|: rtol = atol = 1e-5. Gradients also sum over the batch and the
# output pixels (up to 2 x 9 x 9 = 162 a kernel tap) values that carry the forward's
# error: 1e-4. Measured on AVX2 and AVX: at most 10% of these bounds. bfloat16 (8
# significant bits, 2^-8 = 3.9e-3 a rounding, over K terms): 0.05.


def _pair(kernel, stride, padding, out_channels, use_bias, cls, **kw):
  return cls(out_channels, (kernel, kernel), strides=(stride, stride),
             padding=((padding, padding), (padding, padding)), use_bias=use_bias, **kw)


def _loss_and_grads(module, variables, x, target):
  def loss(params, x):
    y = module.apply({"params": params}, x)
    return jnp.sum((y - target) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1))(variables["params"], x)


@pytest.mark.parametrize("kernel,stride,padding,cin,cout,size,use_bias", RESNET_CONVS)
def test_matches_flax_conv(kernel, stride, padding, cin, cout, size, use_bias):
  ref = _pair(kernel, stride, padding, cout, use_bias, nn.Conv)
  fast = _pair(kernel, stride, padding, cout, use_bias, fast_conv.GemmConv)
  kx, kt, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size, cin))
  ref_vars = ref.init(kp, x)
  fast_vars = fast.init(kp, x)
  # Same names, shapes and (same rng) values: checkpoints and imports carry over.
  assert jax.tree.structure(ref_vars) == jax.tree.structure(fast_vars)
  jax.tree.map(np.testing.assert_array_equal, ref_vars, fast_vars)
  if use_bias:  # A non-zero bias, so its gradient path is exercised.
    ref_vars = jax.tree.map(lambda v: v + 0.1, ref_vars)

  y_ref = ref.apply(ref_vars, x)
  y_fast = jax.jit(fast.apply)(ref_vars, x)
  assert y_fast.shape == y_ref.shape
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)

  target = jax.random.normal(kt, y_ref.shape)
  loss_ref, (gp_ref, gx_ref) = _loss_and_grads(ref, ref_vars, x, target)
  loss_fast, (gp_fast, gx_fast) = jax.jit(
      lambda v, x: _loss_and_grads(fast, v, x, target))(ref_vars, x)
  np.testing.assert_allclose(loss_fast, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               gp_fast, gp_ref)


@pytest.mark.parametrize("size,stride,convolutions", [(2, 1, 0), (4, 2, 0), (3, 1, 1),
                                                      (5, 2, 1)])
def test_few_output_pixels_run_as_matrix_products(size, stride, convolutions):
  """Outputs of <= 4 pixels (2 x 2, 2 x 2 from 4 x 4 by stride 2) lower to matrix
  products, forward and both gradients; 3 x 3 outputs keep XLA's convolution."""
  x, kernel = jnp.ones((2, size, size, 8)), jnp.ones((3, 3, 8, 8))

  def loss(x, kernel):
    return jnp.sum(fast_conv.conv2d(x, kernel, (stride, stride), ((1, 1), (1, 1))))

  hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, kernel).as_text()
  assert hlo.count("stablehlo.convolution") == 2 * convolutions  # forward, input grad


@pytest.mark.parametrize("stride,padding,size", [(1, 1, 6), (2, 1, 7), (1, 0, 5)])
def test_depthwise_conv_matches_flax_conv(stride, padding, size):
  """The MUSP head's value conv (one group per channel): forward and both gradients."""
  kw = dict(strides=(stride, stride), padding=((padding, padding), (padding, padding)),
            feature_group_count=8)
  ref, fast = nn.Conv(8, (3, 3), **kw), fast_conv.GemmConv(8, (3, 3), **kw)
  x = jax.random.normal(jax.random.key(3), (2, size, size, 8))
  variables = jax.tree.map(lambda v: v + 0.1, ref.init(jax.random.key(4), x))
  assert variables["params"]["kernel"].shape == (3, 3, 1, 8)
  y_ref = ref.apply(variables, x)
  np.testing.assert_allclose(jax.jit(fast.apply)(variables, x), y_ref, rtol=1e-5, atol=1e-5)
  target = jax.random.normal(jax.random.key(5), y_ref.shape)
  _, (gp_ref, gx_ref) = _loss_and_grads(ref, variables, x, target)
  _, (gp_fast, gx_fast) = jax.jit(
      lambda v, x: _loss_and_grads(fast, v, x, target))(variables, x)
  np.testing.assert_allclose(gx_fast, gx_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               gp_fast, gp_ref)


def test_other_grouped_convs_fall_back_to_xla():
  ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=4)
  fast = fast_conv.GemmConv(8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=4)
  x = jax.random.normal(jax.random.key(3), (2, 6, 6, 8))
  variables = ref.init(jax.random.key(4), x)
  assert variables["params"]["kernel"].shape == (3, 3, 2, 8)
  np.testing.assert_allclose(fast.apply(variables, x), ref.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  fast = fast_conv.GemmConv(16, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16)
  ref = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)))
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 8))
  variables = fast.init(jax.random.key(6), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  y = fast.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), ref.apply(variables, x),
                             rtol=0.05, atol=0.05)
  grads = jax.grad(lambda p: jnp.sum(fast.apply({"params": p}, x).astype(jnp.float32)))(
      variables["params"])
  assert grads["kernel"].dtype == jnp.float32


def test_same_padding_is_rejected():
  with pytest.raises(ValueError, match="SAME"):
    fast_conv.GemmConv(4, (3, 3), padding="SAME").init(
        jax.random.key(0), jnp.zeros((1, 4, 4, 2)))


def test_resolve_conv_impl():
  assert fast_conv.resolve_conv_impl("xla") == "xla"
  assert fast_conv.resolve_conv_impl("gemm") == "gemm"
  # These tests run on CPU (conftest), where "auto" means the GEMM convolutions.
  assert fast_conv.resolve_conv_impl("auto") == "gemm"
  with pytest.raises(ValueError, match="conv_impl"):
    fast_conv.resolve_conv_impl("cudnn")



def test_resnet_conv_impl_switch_keeps_variables_and_outputs():
  from musp_jax.models import resnet
  x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
  nets = {impl: resnet.ResNet(depth=18, conv_impl=impl) for impl in ("xla", "gemm")}
  variables = nets["xla"].init(jax.random.key(8), x)
  jax.tree.map(np.testing.assert_array_equal, variables,
               nets["gemm"].init(jax.random.key(8), x))
  # Forward in training mode (batch statistics); per-conv gradients are tested above.
  outs = {impl: jax.jit(lambda v, net=net: net.apply(v, x, train=True,
                                                     mutable=["batch_stats"]))(variables)
          for impl, net in nets.items()}
  # A whole ResNet-18 forward: K u reaches 2.7e-4 (layer4's K = 4608) in the worst
  # case; rounding random-walks far below it: 1e-4, measured 4% of it (AVX2 and AVX).
  np.testing.assert_allclose(outs["gemm"][0]["pooled"], outs["xla"][0]["pooled"],
                             rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               outs["gemm"][1], outs["xla"][1])
