"""onnx_lowering: primitives beyond the model's (which test_export covers) against JAX."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from musp_jax.serving import onnx_lowering


def _run(fn, spec, x):
  model = onnx_lowering.convert(fn, spec, input_name="x",
                          output_names=[f"y{i}" for i in range(len(fn(x)))])
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])
  return session.run(None, {"x": x}), model


@pytest.mark.numerics
def test_primitives_match_jax():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)  # HWIO, 2 groups

  def fn(x):  # x: (B, 6, 5, 4)
    y = x[:, ::-1]  # rev
    y = jnp.pad(y, ((0, 0), (1, 2), (0, 0), (0, 0)), constant_values=0.5)
    y = jnp.where(y > 0.1, y ** 3, -y)  # gt, select_n, integer_pow
    gram = jnp.einsum("bhwc,bhwd->bcd", y, y)  # dot_general with a batch dimension
    conv = lax.conv_general_dilated(
        y, kernel, (1, 2), ((2, 2), (1, 1)), rhs_dilation=(2, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    pool = lax.reduce_window(conv, -jnp.inf, lax.max, (1, 3, 2, 1), (1, 2, 1, 1),
                             ((0, 0), (1, 1), (0, 1), (0, 0)))
    strided = conv[:, 1::2, :, ::3]
    filled = jnp.full((x.shape[0], 2), 3.0) + jnp.min(x, axis=(1, 2))[:, :2]
    return (gram, pool, strided, filled, jnp.tanh(jnp.max(y, axis=1)),
            jnp.transpose(y, (0, 3, 1, 2)).reshape(x.shape[0], -1))

  (batch,) = jax.export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, 6, 5, 4), np.float32)
  x = rng.normal(size=(2, 6, 5, 4)).astype(np.float32)
  got, model = _run(fn, spec, x)
  want = fn(x)
  assert len(got) == len(want)
  # onnxruntime's kernels against XLA's on short float32 sums (the gram, the conv):
  # a few ulps relative, rtol 1e-5 (atol for values near 0). Measured 1.8% of the
  # bound (2.4e-4 on values ~1e3, 9.5e-6 relative) on AVX2 and AVX.
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-5, atol=1e-5)
  ops = {n.op_type for n in model.graph.node}
  assert {"Conv", "MaxPool", "Einsum", "Pad", "Where", "Slice", "Expand"} <= ops
  # The batch stays symbolic, named as JAX names it.
  assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_unsupported_primitive_is_named():
  spec = jax.ShapeDtypeStruct((3, 4), np.float32)
  with pytest.raises(NotImplementedError, match="primitive 'sort'"):
    onnx_lowering.convert(lambda x: (jnp.sort(x, axis=-1),), spec, input_name="x",
                    output_names=["y"])
