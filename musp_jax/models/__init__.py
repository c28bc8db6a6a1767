"""Models: ResNet backbone (resnet.py), MUSP/baseline heads (musp.py), weight
import (weights.py). `build_model` turns the config's `model` section into a
ReIDModel; `architecture` is what two model configs must share for one's weights
to be the other's."""

from typing import Any

import jax.numpy as jnp
import ml_collections

from musp_jax.models import musp
from musp_jax.models import resnet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Fields of config.model that change parameter shapes or what the features mean;
# dtype, conv_impl, init_from, attention_init_scale (initialisation only) and the
# loss-side `diversity` do not.
ARCH_FIELDS = ("backbone", "depth", "last_stride", "head", "num_prototypes", "value_conv",
               "value_channels", "ese", "ese_reduction", "attention",
               "global_feature", "pooling", "global_branch", "layer3_stride",
               "attention_temperature", "attention_kernel", "padding")
# What a field added after the first release meant before it existed.
_ARCH_DEFAULTS = {"global_branch": True, "backbone": "resnet", "layer3_stride": 2,
                  "attention_temperature": 1.0, "attention_kernel": 3, "padding": "zeros"}


def compute_dtype(name: str):
  """Maps config.model.dtype to a jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"model.dtype={name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def architecture(model_config: Any) -> dict[str, Any]:
  """The ARCH_FIELDS of a model config (ConfigDict or dict), value_channels resolved.

  Fields a config lacks take their meaning from before they existed (_ARCH_DEFAULTS),
  or None.
  """
  get = model_config.get
  arch = {k: get(k, _ARCH_DEFAULTS.get(k)) for k in ARCH_FIELDS}
  if arch["head"] == "musp" and arch["depth"] in resnet.STAGE_SIZES:
    arch["value_channels"] = musp.resolve_value_channels(
        arch["value_channels"] or 0, value_conv=arch["value_conv"],
        num_prototypes=arch["num_prototypes"],
        in_channels=resnet.output_channels(arch["depth"]))
  return arch


def architecture_diffs(saved: Any, wanted: Any,
                       fields: tuple[str, ...] = ARCH_FIELDS) -> list[str]:
  """"model.<field>: checkpoint has .., config asks .." for each of `fields` that differs.

  A field the saved config does not name and that has no meaning from before it
  existed is not compared: weights converted from another framework fix only some
  fields (an imported backbone, its depth).
  """
  a, b = architecture(saved), architecture(wanted)
  return [f"model.{k}: checkpoint has {a[k]!r}, config asks {b[k]!r}" for k in fields
          if (k in saved or k in _ARCH_DEFAULTS) and a[k] != b[k]]


def build_head(model_config: ml_collections.ConfigDict, num_classes: int):
  """The head named by model_config.head ("musp" or "baseline")."""
  c = model_config
  if c.head == "baseline":
    return musp.BaselineHead(num_classes)
  if c.head != "musp":
    raise ValueError(f"model.head={c.head!r}; expected 'musp' or 'baseline'")
  head = musp.MUSPHead(
      num_classes=num_classes,
      num_prototypes=c.num_prototypes,
      value_conv=c.value_conv,
      value_channels=c.value_channels,
      pooling=c.pooling,
      ese=c.ese,
      ese_reduction=c.ese_reduction,
      attention=c.attention,
      global_feature=c.global_feature,
      diversity=c.diversity,
      global_branch=c.global_branch,
      attention_init_scale=c.get("attention_init_scale", 1.0),
      attention_temperature=c.get("attention_temperature", 1.0),
      attention_kernel=c.get("attention_kernel", 3),
      padding=c.get("padding", "zeros"),
      dtype=compute_dtype(c.dtype),
      conv_impl=c.get("conv_impl", "auto"))
  head.check_settings()  # fail at build time, not after a backbone init
  return head


def build_model(model_config: ml_collections.ConfigDict,
                num_classes: int) -> musp.ReIDModel:
  """Backbone + head as configured (config section `model`)."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  backbone = resnet.ResNet(
      depth=model_config.depth, last_stride=model_config.last_stride,
      layer3_stride=model_config.get("layer3_stride", 2),
      dtype=compute_dtype(model_config.dtype),
      conv_impl=model_config.get("conv_impl", "auto"),
      backbone=model_config.get("backbone", "resnet"),
      padding=model_config.get("padding", "zeros"))
  return musp.ReIDModel(backbone=backbone,
                        head=build_head(model_config, num_classes))
