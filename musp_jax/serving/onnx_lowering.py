"""A jaxpr -> ONNX lowering, enough for the exported serving function.

`convert(fn, spec)` traces `fn` with `jax.make_jaxpr` (the batch dimension may
be symbolic, from `jax.export.symbolic_shape`) and writes each primitive of the
jaxpr as ONNX operators (opset 17), so the graph computes exactly what the JAX
function computes. Three rules keep the graph small and exact:

  * every computation that does not depend on the input (weight preprocessing,
    resize kernels, index tables) is evaluated now, with JAX, and stored as a
    constant (constant folding by the same primitives);
  * equations whose results the outputs do not need are dropped;
  * calls (jit, custom_jvp/custom_vjp) are inlined; only their primal
    computation is kept.

Layouts: JAX convolutions and pooling here are NHWC, ONNX's NCHW; each is
wrapped in transposes, which onnxruntime's optimizer cancels between
neighbours. A primitive without a rule raises NotImplementedError naming it.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

OPSET = 17
IR_VERSION = 8  # the ONNX IR of opset 17, read by older runtimes as well
_INT64_MAX = np.iinfo(np.int64).max

Value = Any  # np.ndarray (a constant) or str (the name of an ONNX tensor)


def _is_static(shape) -> bool:
  return all(isinstance(d, (int, np.integer)) for d in shape)


def _dim_param(d) -> int | str:
  return int(d) if isinstance(d, (int, np.integer)) else str(d)


def _same_dim(a, b) -> bool:
  if isinstance(a, (int, np.integer)) or isinstance(b, (int, np.integer)):
    return isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and a == b
  return str(a) == str(b)  # symbolic: the same expression


class _Graph:
  """ONNX nodes and initializers under construction."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._const_names: dict[tuple, str] = {}
    self.dims: dict[str, str] = {}  # symbolic dimension -> (1,) int64 tensor of its size

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value: np.ndarray) -> str:
    """An initializer for `value`; equal arrays share one (weights used twice)."""
    value = np.array(value, order="C", copy=None)  # (ascontiguousarray makes 0-d 1-d)
    key = (value.dtype.str, value.shape, hashlib.blake2b(value.tobytes()).digest())
    if key not in self._const_names:
      name = self.fresh("const")
      self.initializers.append(numpy_helper.from_array(value, name))
      self._const_names[key] = name
    return self._const_names[key]

  def tensor(self, value: Value) -> str:
    return value if isinstance(value, str) else self.const(value)

  def op(self, op_type: str, inputs: Sequence[Value], **attrs) -> str:
    out = self.fresh(op_type.lower())
    self.nodes.append(helper.make_node(
        op_type, [self.tensor(v) if v is not None else "" for v in inputs], [out], **attrs))
    return out

  def ints(self, values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, np.int64)

  def shape(self, shape: Sequence[Any]) -> Value:
    """A 1-D int64 shape; symbolic sizes are read from the input at run time."""
    if _is_static(shape):
      return self.ints(shape)
    pieces = []
    for d in shape:
      if isinstance(d, (int, np.integer)):
        pieces.append(self.ints([d]))
      elif str(d) in self.dims:
        pieces.append(self.dims[str(d)])
      else:
        raise NotImplementedError(f"shape {shape}: {d} is not an input dimension")
    return self.op("Concat", pieces, axis=0)


# --------------------------------------------------------------------------
# Rules: (graph, eqn, inputs) -> outputs. Inputs are Values; at least one is a
# tensor (all-constant equations are folded before a rule is called).

_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "abs": "Abs",
          "logistic": "Sigmoid", "tanh": "Tanh", "floor": "Floor", "ceil": "Ceil",
          "sign": "Sign", "not": "Not", "stop_gradient": "Identity",
          "copy": "Identity", "copy_p": "Identity", "sharding_constraint": "Identity"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
           "min": "Min", "pow": "Pow", "gt": "Greater", "lt": "Less",
           "ge": "GreaterOrEqual", "le": "LessOrEqual", "eq": "Equal", "and": "And",
           "or": "Or"}


def _aval(v):
  return v.aval


def _operand_const(v: Value, aval) -> Value:
  """Literal/constant operands get the dtype of their aval (ONNX has no promotion)."""
  return np.asarray(v, aval.dtype) if not isinstance(v, str) else v


def _rule_unary(g, eqn, ins):
  return [g.op(_UNARY[eqn.primitive.name], ins)]


def _rule_binary(g, eqn, ins):
  ins = [_operand_const(v, _aval(a)) for v, a in zip(ins, eqn.invars)]
  return [g.op(_BINARY[eqn.primitive.name], ins)]


def _rule_ne(g, eqn, ins):
  ins = [_operand_const(v, _aval(a)) for v, a in zip(ins, eqn.invars)]
  return [g.op("Not", [g.op("Equal", ins)])]


def _rule_rsqrt(g, eqn, ins):
  return [g.op("Reciprocal", [g.op("Sqrt", ins)])]


def _rule_integer_pow(g, eqn, ins):
  y = eqn.params["y"]
  if y == 2:
    return [g.op("Mul", [ins[0], ins[0]])]
  return [g.op("Pow", [ins[0], np.asarray(y, _aval(eqn.invars[0]).dtype)])]


def _rule_square(g, eqn, ins):
  return [g.op("Mul", [ins[0], ins[0]])]


def _rule_select_n(g, eqn, ins):
  if len(ins) != 3:
    raise NotImplementedError("select_n with more than two cases")
  pred, false, true = (_operand_const(v, _aval(a)) for v, a in zip(ins, eqn.invars))
  if _aval(eqn.invars[0]).dtype != np.bool_:
    pred = g.op("Cast", [pred], to=onnx.TensorProto.BOOL)
  return [g.op("Where", [pred, true, false])]


def _rule_convert(g, eqn, ins):
  to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
  return [g.op("Cast", ins, to=to)]


def _shape_with_inferred(shape) -> np.ndarray:
  """A Reshape target: the one symbolic dimension becomes -1."""
  symbolic = [i for i, d in enumerate(shape) if not isinstance(d, (int, np.integer))]
  if len(symbolic) > 1:
    raise NotImplementedError(f"reshape to {shape}: more than one symbolic dimension")
  return np.asarray([-1 if i in symbolic else int(d) for i, d in enumerate(shape)],
                    np.int64)


def _rule_reshape(g, eqn, ins):
  if eqn.params.get("dimensions") is not None:
    raise NotImplementedError("reshape with dimensions")
  return [g.op("Reshape", [ins[0], _shape_with_inferred(eqn.params["new_sizes"])])]


def _rule_squeeze(g, eqn, ins):
  return [g.op("Squeeze", [ins[0], g.ints(eqn.params["dimensions"])])]


def _rule_broadcast_in_dim(g, eqn, ins):
  shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  in_shape = _aval(eqn.invars[0]).shape
  x = ins[0]
  missing = [d for d in range(len(shape)) if d not in dims]
  if missing:  # broadcast_dimensions are increasing: unsqueezing keeps the order
    x = g.op("Unsqueeze", [x, g.ints(missing)])
  unsqueezed = [1] * len(shape)
  for i, d in enumerate(dims):
    unsqueezed[d] = in_shape[i]
  # Expand's shape; 1 keeps the operand's size (symbolic sizes it already has).
  target = [1 if _same_dim(size, have) else size for size, have in zip(shape, unsqueezed)]
  if any(t != 1 for t in target):
    x = g.op("Expand", [x, g.shape(target)])
  return [x]


def _rule_transpose(g, eqn, ins):
  return [g.op("Transpose", ins, perm=list(eqn.params["permutation"]))]


def _rule_concatenate(g, eqn, ins):
  ins = [_operand_const(v, _aval(a)) for v, a in zip(ins, eqn.invars)]
  return [g.op("Concat", ins, axis=int(eqn.params["dimension"]))]


def _rule_slice(g, eqn, ins):
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(starts)
  ends = [int(e) if isinstance(e, (int, np.integer)) else _INT64_MAX for e in limits]
  return [g.op("Slice", [ins[0], g.ints([int(s) for s in starts]), g.ints(ends),
                         g.ints(range(len(starts))), g.ints(strides)])]


def _rule_rev(g, eqn, ins):
  axes = list(eqn.params["dimensions"])
  n = len(axes)
  return [g.op("Slice", [ins[0], g.ints([-1] * n), g.ints([-_INT64_MAX] * n),
                         g.ints(axes), g.ints([-1] * n)])]


def _rule_pad(g, eqn, ins):
  config = [tuple(int(v) for v in c) for c in eqn.params["padding_config"]]
  if any(interior for _, _, interior in config) or any(
      lo < 0 or hi < 0 for lo, hi, _ in config):
    raise NotImplementedError("pad with interior or negative padding")
  if not any(lo or hi for lo, hi, _ in config):
    return [ins[0]]
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  value = _operand_const(ins[1], _aval(eqn.invars[1]))
  return [g.op("Pad", [ins[0], g.ints(pads), value], mode="constant")]


def _rule_reduce(op_type: str) -> Callable:
  def rule(g, eqn, ins):
    axes = [int(a) for a in eqn.params["axes"]]
    if op_type == "ReduceSum":  # axes are an input from opset 13 on, others from 18
      return [g.op(op_type, [ins[0], g.ints(axes)], keepdims=0)]
    return [g.op(op_type, ins, axes=axes, keepdims=0)]
  return rule


def _rule_dot_general(g, eqn, ins):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs_rank, rhs_rank = (len(_aval(v).shape) for v in eqn.invars)
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in range(lhs_rank)]
  rhs = [None] * rhs_rank
  for l, r in zip(lc, rc):
    rhs[r] = lhs[l]
  for l, r in zip(lb, rb):
    rhs[r] = lhs[l]
  rhs = [c or next(letters) for c in rhs]
  out = ([lhs[d] for d in lb] + [lhs[d] for d in range(lhs_rank) if d not in lc + lb]
         + [rhs[d] for d in range(rhs_rank) if d not in rc + rb])
  equation = f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"
  ins = [_operand_const(v, _aval(a)) for v, a in zip(ins, eqn.invars)]
  return [g.op("Einsum", ins, equation=equation)]


def _inverse(perm: Sequence[int]) -> list[int]:
  return [int(i) for i in np.argsort(perm)]


def _rule_conv(g, eqn, ins):
  p = eqn.params
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise NotImplementedError("conv_general_dilated with lhs dilation or batch groups")
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  x, w = ins
  x = g.op("Transpose", [x], perm=list(lhs_spec))  # -> N, C, spatial
  w = (np.ascontiguousarray(np.transpose(w, rhs_spec)) if not isinstance(w, str)
       else g.op("Transpose", [w], perm=list(rhs_spec)))  # -> O, I, spatial
  pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
  y = g.op("Conv", [x, w], strides=[int(s) for s in p["window_strides"]], pads=pads,
           dilations=[int(d) for d in p["rhs_dilation"]],
           group=int(p["feature_group_count"]))
  return [g.op("Transpose", [y], perm=_inverse(out_spec))]


def _rule_reduce_window_max(g, eqn, ins):
  p = eqn.params
  window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  if any(d != 1 for d in tuple(p["base_dilation"])):
    raise NotImplementedError("reduce_window_max with base dilation")
  pooled = [d for d in range(len(window))
            if window[d] != 1 or strides[d] != 1 or tuple(padding[d]) != (0, 0)]
  kept = [d for d in range(len(window)) if d not in pooled]
  if len(kept) != 2:
    raise NotImplementedError("reduce_window_max over other than all-but-two axes")
  perm = kept + pooled  # -> N, C, spatial
  x = g.op("Transpose", ins, perm=perm)
  y = g.op("MaxPool", [x], kernel_shape=[int(window[d]) for d in pooled],
           strides=[int(strides[d]) for d in pooled],
           pads=[int(padding[d][0]) for d in pooled] + [int(padding[d][1]) for d in pooled],
           dilations=[int(p["window_dilation"][d]) for d in pooled])
  return [g.op("Transpose", [y], perm=_inverse(perm))]


def _rule_gather(g, eqn, ins):
  """A gather with constant indices, as one ONNX Gather over flat positions.

  The positions are found by running the same gather on an operand holding its
  own flat index (batch 1); the batch dimension must pass through whole.
  """
  operand, indices = ins
  if isinstance(indices, str):
    raise NotImplementedError("gather with data-dependent indices")
  p = eqn.params
  shape, out_shape = _aval(eqn.invars[0]).shape, _aval(eqn.outvars[0]).shape
  dnums = p["dimension_numbers"]
  batch_ok = (_is_static(shape[1:]) and _is_static(out_shape[1:])
              and _same_dim(p["slice_sizes"][0], shape[0])
              and 0 not in dnums.collapsed_slice_dims
              and dnums.offset_dims and dnums.offset_dims[0] == 0)
  if not batch_ok:
    raise NotImplementedError("gather other than along the non-batch dimensions")
  static = tuple(int(d) for d in shape[1:])
  positions = np.arange(int(np.prod(static)), dtype=np.int64).reshape((1, *static))
  params = dict(p, slice_sizes=(1, *p["slice_sizes"][1:]))
  flat = np.asarray(eqn.primitive.bind(positions, indices, **params))[0]
  x = g.op("Reshape", [operand, g.ints([-1, positions.size])])
  return [g.op("Gather", [x, flat], axis=1)]


_RULES: dict[str, Callable] = {
    **{name: _rule_unary for name in _UNARY},
    **{name: _rule_binary for name in _BINARY},
    "ne": _rule_ne, "rsqrt": _rule_rsqrt, "integer_pow": _rule_integer_pow,
    "square": _rule_square, "select_n": _rule_select_n,
    "convert_element_type": _rule_convert, "reshape": _rule_reshape,
    "squeeze": _rule_squeeze, "broadcast_in_dim": _rule_broadcast_in_dim,
    "transpose": _rule_transpose, "concatenate": _rule_concatenate,
    "slice": _rule_slice, "rev": _rule_rev, "pad": _rule_pad,
    "reduce_sum": _rule_reduce("ReduceSum"), "reduce_max": _rule_reduce("ReduceMax"),
    "reduce_min": _rule_reduce("ReduceMin"), "reduce_prod": _rule_reduce("ReduceProd"),
    "dot_general": _rule_dot_general, "conv_general_dilated": _rule_conv,
    "reduce_window_max": _rule_reduce_window_max, "gather": _rule_gather,
}


# --------------------------------------------------------------------------
# Walking the jaxpr.


def _sub_jaxpr(eqn) -> jcore.ClosedJaxpr | None:
  """The body of a call-like equation (jit, custom_jvp_call, custom_vjp_call)."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = eqn.params.get(key)
    if isinstance(body, jcore.ClosedJaxpr):
      return body
    if isinstance(body, jcore.Jaxpr):
      return jcore.ClosedJaxpr(body, ())
  return None


def _live(jaxpr: jcore.Jaxpr, needed: Sequence[bool]) -> set:
  """Variables the needed outputs depend on (dead equations are skipped)."""
  live = {v for v, n in zip(jaxpr.outvars, needed)
          if n and not isinstance(v, jcore.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
      live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
  return live


def _broadcast_in_dim(x, *, shape, broadcast_dimensions, **_):
  unsqueezed = [1] * len(shape)
  for i, d in enumerate(broadcast_dimensions):
    unsqueezed[d] = x.shape[i]
  return np.broadcast_to(x.reshape(unsqueezed), shape)


# Folding rules in numpy for data movement and correctly rounded float
# arithmetic (bit-identical to XLA); every other primitive is evaluated by JAX,
# which compiles it once per shape, so this keeps conversion fast.
_NUMPY_FOLD = {
    "add": lambda x, y, **_: x + y, "sub": lambda x, y, **_: x - y,
    "mul": lambda x, y, **_: x * y, "max": lambda x, y, **_: np.maximum(x, y),
    "min": lambda x, y, **_: np.minimum(x, y), "neg": lambda x, **_: -x,
    "reshape": lambda x, *, new_sizes, dimensions, **_: (
        x.reshape(new_sizes) if dimensions is None else None),
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": lambda x, *, permutation, **_: np.transpose(x, permutation),
    "squeeze": lambda x, *, dimensions, **_: np.squeeze(x, tuple(dimensions)),
    "concatenate": lambda *xs, dimension, **_: np.concatenate(xs, dimension),
    "iota": lambda *, dtype, shape, dimension, **_: np.broadcast_to(
        np.arange(shape[dimension], dtype=dtype).reshape(
            [-1 if i == dimension else 1 for i in range(len(shape))]), shape),
}
_DATA_MOVEMENT = ("reshape", "broadcast_in_dim", "transpose", "squeeze", "concatenate",
                  "iota")


def _fold(eqn, values: list[np.ndarray]) -> list[np.ndarray]:
  """Evaluates a leaf primitive on constants (calls are walked into instead)."""
  name, out_dtype = eqn.primitive.name, eqn.outvars[0].aval.dtype
  if name in _DATA_MOVEMENT or (name in _NUMPY_FOLD and
                                np.issubdtype(out_dtype, np.floating)):
    out = _NUMPY_FOLD[name](*values, **eqn.params)
    if out is not None:
      return [np.asarray(out, out_dtype)]
  out = eqn.primitive.bind(*values, **eqn.params)
  out = out if eqn.primitive.multiple_results else [out]
  return [np.asarray(o) for o in out]


def _lower(g: _Graph, jaxpr: jcore.Jaxpr, consts: Sequence[Any],
           args: Sequence[Value], needed: Sequence[bool]) -> list[Value | None]:
  env: dict[Any, Value] = {}

  def read(v) -> Value:
    if isinstance(v, jcore.Literal):
      return np.asarray(v.val, v.aval.dtype)
    return env[v]

  env.update((v, np.asarray(c)) for v, c in zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  live = _live(jaxpr, needed)
  for eqn in jaxpr.eqns:
    outvars = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
    if not any(v in live for v in outvars):
      continue
    ins = [read(v) for v in eqn.invars]
    constant = not any(isinstance(v, str) for v in ins)
    body = _sub_jaxpr(eqn)
    if body is not None:
      n = len(body.jaxpr.invars)  # custom_vjp_call may pass extra leading operands
      outs = _lower(g, body.jaxpr, body.consts, ins[len(ins) - n:],
                    [v in live for v in eqn.outvars])
    elif constant and all(_is_static(v.aval.shape) for v in eqn.outvars):
      outs = _fold(eqn, ins)
    elif eqn.primitive.name in _RULES:
      outs = _RULES[eqn.primitive.name](g, eqn, ins)
    else:
      raise NotImplementedError(
          f"onnx_lowering: no ONNX rule for the JAX primitive {eqn.primitive.name!r}")
    for v, out in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = out
  return [read(v) if n else None for v, n in zip(jaxpr.outvars, needed)]


def convert(fn: Callable, spec: jax.ShapeDtypeStruct, *, input_name: str,
            output_names: Sequence[str], doc: str = "") -> onnx.ModelProto:
  """An ONNX model of `fn(x)` -> tuple of arrays, for inputs like `spec`.

  Symbolic dimensions of `spec` (jax.export.symbolic_shape) stay dynamic in
  the model, named as JAX names them.
  """
  closed = jax.make_jaxpr(fn)(spec)
  if len(closed.jaxpr.outvars) != len(output_names):
    raise ValueError(f"onnx_lowering: fn returns {len(closed.jaxpr.outvars)} arrays, "
                     f"{len(output_names)} output names given")
  g = _Graph()
  for i, d in enumerate(spec.shape):
    if not isinstance(d, (int, np.integer)) and str(d) not in g.dims:
      g.dims[str(d)] = g.op("Shape", [input_name], start=i, end=i + 1)
  outs = _lower(g, closed.jaxpr, closed.consts, [input_name],
                [True] * len(output_names))
  for name, out in zip(output_names, outs):
    g.nodes.append(helper.make_node("Identity", [g.tensor(out)], [name]))

  def info(name, aval):
    return helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype)),
        [_dim_param(d) for d in aval.shape])

  graph = helper.make_graph(
      g.nodes, "serving_fn", [info(input_name, spec)],
      [info(n, v.aval) for n, v in zip(output_names, closed.jaxpr.outvars)],
      initializer=g.initializers, doc_string=doc)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="musp_jax", ir_version=IR_VERSION)
  onnx.checker.check_model(model, full_check=True)
  return model
