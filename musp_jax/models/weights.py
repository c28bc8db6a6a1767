"""PyTorch weight import.

Two jobs:
  * `import_resnet`: a torchvision `resnet{18,34,50,101,152}` state_dict, or a
    ResNet-IBN-a one (the IBN-Net release's, or a fast-reid model's backbone:
    `ibn_backbone`), into ResNet variables (names in models/resnet.py's docstring).
  * `import_musp`: a whole official-MUSP checkpoint (backbone + head) into
    ReIDModel variables. Official head names:
        key.{weight,bias}            head/attention_conv
        value.{weight,bias}          head/value_conv
        c_.fc.0.weight, c_.fc.2.weight   head/ese/fc1, fc2
        neck.{i}, classifier.{i}     head/part_branches[i] for i < n-1,
                                     head/global_branch for i = n-1 (if
                                     the checkpoint has it: n classifiers)

State dicts are read from `.pth`/`.pt`/`.tar` (needs torch), `.npz` or
`.safetensors` (no torch). Every mismatch is reported at once: missing,
unexpected and mis-shaped keys, each with its shape.
"""

from collections.abc import Mapping, Sequence
import os
import pickle
import re
from typing import Any
import zipfile

from flax import traverse_util
import numpy as np

from musp_jax.models import resnet

Variables = Mapping[str, Any]
StateDict = dict[str, np.ndarray]

# Conv kernels: torch OIHW -> Flax HWIO; linear: torch (out, in) -> (in, out).
_CONV_PERM = (2, 3, 1, 0)
_LINEAR_PERM = (1, 0)
# Keys PyTorch stores that have no Flax counterpart.
_ALWAYS_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


class WeightImportError(ValueError):
  """A state dict or checkpoint does not fit the model's variables."""


def load_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads a PyTorch state dict as {name: numpy array}.

  Accepts a bare state dict or a training checkpoint holding one under
  "state_dict" (the official MUSP format) or "model" (fast-reid's), and strips
  DataParallel's "module." prefix.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  if path.endswith((".npz", ".safetensors")):
    try:
      if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
          sd = {k: f[k] for k in f.files}
      else:
        from safetensors.numpy import load_file
        sd = load_file(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise WeightImportError(f"{path} is not a readable {os.path.splitext(path)[1]} "
                              f"file of tensors: {_first_line(e)}") from e
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(
          f"reading {path} needs torch (pip install 'musp-jax[torch]'); or "
          "convert it to .npz/.safetensors") from e
    try:
      # weights_only: never run pickled code from a downloaded checkpoint.
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise WeightImportError(
          f"{path} holds objects other than tensors and plain containers; "
          "re-save just its state_dict (torch.save(ckpt['state_dict'], ...))"
          f": {_first_line(e)}") from e
    except Exception as e:  # torch reports a truncated or foreign file many ways
      raise WeightImportError(
          f"{path} is not a readable PyTorch file (truncated or another format?): "
          f"{_first_line(e)}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj:
      obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
      obj = obj["model"]
    if not isinstance(obj, Mapping):
      raise WeightImportError(f"{path} holds a {type(obj).__name__}, not a "
                              "state dict")
    sd = {k: v.detach().float().numpy() if v.is_floating_point()
          else v.numpy() for k, v in obj.items() if torch.is_tensor(v)}
  return {k.removeprefix("module."): np.asarray(v) for k, v in sd.items()}


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _leaf_source(collection: str, leaf: str, ndim: int) -> tuple[str, Any]:
  """The torch parameter name suffix and transpose for a Flax leaf."""
  if collection == "batch_stats":
    return {"mean": "running_mean", "var": "running_var"}[leaf], None
  if leaf == "kernel":
    return "weight", _CONV_PERM if ndim == 4 else _LINEAR_PERM
  return {"scale": "weight", "bias": "bias", "frozen_bias": "bias"}[leaf], None


def _backbone_module_name(name: str) -> str:
  """Flax module name -> torchvision's: layer2_0 -> layer2.0 etc."""
  if name == "downsample_conv":
    return "downsample.0"
  if name == "downsample_bn":
    return "downsample.1"
  m = re.fullmatch(r"layer(\d)_(\d+)", name)
  return f"layer{m[1]}.{m[2]}" if m else name


_HEAD_MODULES = {"attention_conv": "key", "value_conv": "value", "ese": "c_",
                 "fc1": "fc.0", "fc2": "fc.2"}


def _torch_keys(collection: str, modules: Sequence[str], leaf: str,
                shape: tuple[int, ...], *, in_head: bool,
                num_parts: int) -> tuple[tuple[str, ...], Any, bool]:
  """torch keys, transpose and whether stacked, for one Flax leaf.

  `modules` is the leaf's module path inside the ResNet or inside the head.
  """
  stacked = in_head and modules[0] == "part_branches"
  suffix, perm = _leaf_source(collection, leaf,
                              len(shape) - (1 if stacked else 0))
  if in_head and modules[0] in ("part_branches", "global_branch"):
    # neck/bn/scale -> neck.{i}.weight, neck/frozen_bias -> neck.{i}.bias,
    # classifier/kernel -> classifier.{i}.weight; the global branch is last.
    indices = range(shape[0]) if stacked else (num_parts,)
    return (tuple(f"{modules[1]}.{i}.{suffix}" for i in indices), perm,
            stacked)
  if in_head:
    names = [_HEAD_MODULES[m] for m in modules]
  else:
    names = [_backbone_module_name(m) for m in modules]
  return (".".join(names + [suffix]),), perm, False


def _inverse_shape(shape: tuple[int, ...], perm) -> tuple[int, ...]:
  """The torch shape that `perm` turns into the Flax `shape`."""
  if perm is None:
    return tuple(shape)
  out = [0] * len(shape)
  for flax_axis, torch_axis in enumerate(perm):
    out[torch_axis] = shape[flax_axis]
  return tuple(out)


def _raise_on_mismatch(what: str, missing: list[str], misshaped: list[str],
                       unexpected: list[str]) -> None:
  """One error listing every problem, so a user fixes them in one go."""
  if not (missing or misshaped or unexpected):
    return
  lines = [f"{what} does not fit the model:"]
  for title, items in (("missing", missing), ("mis-shaped", misshaped),
                       ("unexpected", unexpected)):
    if items:
      lines.append(f"  {len(items)} {title} key(s):")
      lines.extend(f"    {item}" for item in sorted(items))
  raise WeightImportError("\n".join(lines))


def _fill(template: Variables, state_dict: StateDict, *, layout: str,
          num_parts: int = 0, ignore: Sequence[str] = (),
          what: str) -> dict[str, Any]:
  """Builds variables shaped like `template` from a torch state dict.

  `layout` says what `template` holds: "resnet" (a ResNet's variables) or
  "model" (a ReIDModel's: "backbone" and/or "head" under each collection).
  Raises one WeightImportError naming every missing, mis-shaped and
  unexpected key.
  """
  flat = traverse_util.flatten_dict(_to_dict(template))
  out, consumed = {}, set()
  missing, misshaped = [], []
  for path, leaf in flat.items():
    collection, *modules, name = path
    in_head = False
    if layout == "model":  # drop the "backbone" / "head" level
      in_head = modules[0] == "head"
      modules = modules[1:]
    keys, perm, stacked = _torch_keys(collection, modules, name, leaf.shape,
                                      in_head=in_head, num_parts=num_parts)
    want = _inverse_shape(leaf.shape[1:] if stacked else leaf.shape, perm)
    pieces = []
    for k in keys:
      consumed.add(k)
      if k not in state_dict:
        missing.append(f"{k} (expected shape {want}, for {'/'.join(path)})")
      elif tuple(state_dict[k].shape) != want:
        misshaped.append(f"{k}: has shape {tuple(state_dict[k].shape)}, "
                         f"expected {want} (for {'/'.join(path)} "
                         f"{tuple(leaf.shape)})")
      else:
        v = state_dict[k]
        pieces.append(np.transpose(v, perm) if perm else v)
    if len(pieces) == len(keys):
      value = np.stack(pieces) if stacked else pieces[0]
      out[path] = np.asarray(value, dtype=leaf.dtype)
  unexpected = [
      f"{k} {tuple(v.shape)}" for k, v in state_dict.items()
      if k not in consumed and not _ALWAYS_IGNORED.search(k)
      and not any(k.startswith(p) for p in ignore)]
  _raise_on_mismatch(what, missing, misshaped, unexpected)
  return traverse_util.unflatten_dict(out)


def _to_dict(tree: Any) -> Any:
  """FrozenDict / Mapping -> plain nested dict (leaves untouched)."""
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def import_resnet(state_dict: StateDict, variables: Variables, *,
                  ignore: Sequence[str] = (),
                  what: str = "torchvision state dict") -> dict[str, Any]:
  """torchvision ResNet state dict -> ResNet variables shaped like `variables`.

  Args:
    state_dict: from `load_state_dict` (or a torch module's `state_dict()`
      converted to numpy).
    variables: a ResNet's {"params", "batch_stats"} (e.g. from
      jax.eval_shape(resnet.init, ...)); only shapes and dtypes are used.
    ignore: key prefixes to drop silently, e.g. ("fc.",) when the model has
      no ImageNet classifier.
    what: how to name the source in errors.
  """
  return _fill(variables, state_dict, layout="resnet", ignore=ignore,
               what=what)


def _num_parts(head_params: Mapping[str, Any], what: str) -> int:
  if "part_branches" not in head_params:
    raise WeightImportError(f"{what}: needs a model with the MUSP head "
                            "(model.head='musp')")
  return head_params["part_branches"]["classifier"]["kernel"].shape[0]


def import_musp(state_dict: StateDict, variables: Variables, *,
                what: str = "official MUSP checkpoint") -> dict[str, Any]:
  """Official-MUSP state dict (backbone + head) -> ReIDModel variables.

  `variables` must come from a ReIDModel with a MUSP head built to the
  checkpoint's shapes (depth, n, c, ESE, global branch, number of classes);
  see `musp_checkpoint_shapes`.
  """
  head = variables["params"].get("head", {})
  num_parts = _num_parts(head, what)
  _, has_global = _official_layout(state_dict, what)
  if has_global != ("global_branch" in head):
    raise WeightImportError(
        f"{what} {'has a' if has_global else 'has no'} global branch; build "
        f"the model with model.global_branch={has_global}")
  return _fill(variables, state_dict, layout="model", num_parts=num_parts,
               what=what)


def _official_layout(state_dict: StateDict, what: str) -> tuple[int, bool]:
  """(n, whether there is a global branch) of an official-MUSP state dict.

  The official code keeps n - 1 part branches (one discarded background
  prototype) and adds a global one with `--has-global`: n classifiers mean a
  global branch, n - 1 none.
  """
  for k in ("key.weight", "value.weight", "classifier.0.weight"):
    if k not in state_dict:
      raise WeightImportError(f"{what}: no {k!r}; is it a MUSP (attention) "
                              "model?")
  n = int(state_dict["key.weight"].shape[0])
  num_branches = len([k for k in state_dict
                      if re.fullmatch(r"classifier\.\d+\.weight", k)])
  if num_branches not in (n - 1, n):
    raise WeightImportError(
        f"{what}: {num_branches} classifiers for {n} prototypes; expected "
        f"{n - 1} parts (one discarded background prototype) and optionally a "
        f"global branch: {n - 1} or {n}")
  return n, num_branches == n


def musp_checkpoint_shapes(state_dict: StateDict, *,
                           what: str = "official MUSP checkpoint") -> dict[str, Any]:
  """Reads the model settings that an official-MUSP state dict implies.

  Returns model-config fields (depth, num_prototypes, value_channels,
  value_conv, ese, ese_reduction, global_branch, pooling) plus num_classes.
  Pooling is "official": the official `bmm(...) / h*w` at any input size.
  """
  n, has_global = _official_layout(state_dict, what)
  in_channels = state_dict["key.weight"].shape[1]
  c, value_in = state_dict["value.weight"].shape[:2]
  out = {
      "depth": resnet_depth(state_dict, what=what),
      "num_prototypes": n,
      "value_channels": int(c),
      "value_conv": "full" if value_in == in_channels else "depthwise",
      "ese": "all" if "c_.fc.0.weight" in state_dict else "none",
      "global_branch": has_global,
      "pooling": "official",
      "num_classes": int(state_dict["classifier.0.weight"].shape[0]),
  }
  if out["ese"] == "all":
    hidden, width = state_dict["c_.fc.0.weight"].shape
    out["ese_reduction"] = int(width // hidden)
  return out


def resnet_depth(state_dict: StateDict, *, what: str = "state dict") -> int:
  """The torchvision depth whose block counts match the state dict."""
  kind = "bottleneck" if "layer1.0.conv3.weight" in state_dict else "basic"
  counts = []
  for stage in range(1, 5):
    blocks = {int(m[1]) for k in state_dict
              if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
    counts.append(len(blocks))
  for depth, (k, sizes) in resnet.STAGE_SIZES.items():
    if k == kind and tuple(counts) == sizes:
      return depth
  raise WeightImportError(f"{what} has {kind} blocks per stage {counts}; no "
                          "torchvision ResNet has that layout (expected a ResNet-"
                          f"{'/'.join(map(str, resnet.STAGE_SIZES))} state dict)")


IBN_MARKER = "layer1.0.bn1.IN.weight"  # the first instance norm of an IBN-a ResNet
# Running statistics an InstanceNorm saved by older PyTorch versions may carry; IBN-a's
# instance norms use each image's own statistics (no running ones), so none is read.
_INSTANCE_STATS = re.compile(r"\.IN\.(running_mean|running_var|num_batches_tracked)$")


def is_ibn_a(state_dict: StateDict) -> bool:
  """Whether a ResNet state dict (or a fast-reid model's) has IBN-a's split norms."""
  return IBN_MARKER in state_dict or f"backbone.{IBN_MARKER}" in state_dict


def ibn_backbone(state_dict: StateDict, *, what: str = "state dict") -> StateDict:
  """The ResNet-IBN-a backbone of an IBN-Net or fast-reid state dict, in IBN-Net's
  names (layer1.0.bn1.IN.weight, layer1.0.bn1.BN.running_mean, ...).

  A fast-reid model keeps its backbone under "backbone." beside its heads and pixel
  statistics, which are left out; IBN-Net's ImageNet classifier (fc.*) is left to the
  caller's `ignore`. Instance-norm running statistics, if any, are dropped.
  """
  if f"backbone.{IBN_MARKER}" in state_dict:
    state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items()
                  if k.startswith("backbone.")}
  if IBN_MARKER not in state_dict:
    raise WeightImportError(
        f"{what} has no {IBN_MARKER!r} (nor 'backbone.{IBN_MARKER}'): it is not a "
        "ResNet-IBN-a state dict; a torchvision ResNet imports with --torchvision")
  return {k: v for k, v in state_dict.items() if not _INSTANCE_STATS.search(k)}
