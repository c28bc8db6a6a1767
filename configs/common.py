"""The official MUSP recipe (docs/design.md sections 1-4); dataset configs override a few
fields.

    python -m musp_jax.main --config configs/common.py --workdir workdirs/common

Dataset configs call `get_config()` and change what differs; they never copy it.
The config is locked: `--config.model.nmu=3` fails with the unknown key named.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The recipe; `arg` takes the variant words of apply_variants."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data (tfds_builders/, musp_jax/data/datasets.py) ---
  c.dataset = ml_collections.ConfigDict()
  # veri776 | vehicle_id | veri_wild | synthetic_vehicles | the name of a dataset built
  # from your own images (`build_dataset folder --name NAME`); several, comma-separated,
  # train together (e.g. "veri776,vehicle_id,veri_wild": labels offset per dataset).
  c.dataset.name = "synthetic_vehicles"
  # TFDS builder config: the synthetic dataset's size (tiny | small | large); the
  # licensed datasets and your own have none ("").
  c.dataset.builder_config = "small"
  c.dataset.data_dir = "~/tensorflow_datasets"
  c.dataset.manual_dir = ""  # only needed to build a licensed dataset
  # fast-reid's COMBINEALL: each training dataset's largest test set trains too (its
  # test identities become classes), so its own protocols mean nothing: evaluate on
  # another dataset (eval.dataset).
  c.dataset.combine_all = False

  # --- input pipeline (sampling.py, augment.py, input_pipeline.py) ---
  c.input = ml_collections.ConfigDict()
  c.input.image_size = (256, 256)
  c.input.num_ids = 16  # P identities per batch
  c.input.num_instances = 4  # K images per identity
  # Several training datasets: False draws the P identities from their union (in
  # proportion to each one's size); True takes a fixed share of P from every dataset.
  c.input.balance_datasets = False
  c.input.num_workers = 4  # grain worker processes; 0 = in-process
  c.input.prefetch_buffer = 2
  c.input.normalize = "half"  # half: mean=std=0.5 (official) | imagenet
  c.input.translate_prob = 0.5  # resize to translate_scale x then random crop
  c.input.translate_scale = 1.125
  c.input.flip_prob = 0.5
  c.input.erase_prob = 0.5
  c.input.erase_area = (0.02, 0.4)
  c.input.erase_min_aspect = 0.3
  c.input.erase_fill = (0.4914, 0.4822, 0.4465)

  # --- model (models/) ---
  c.model = ml_collections.ConfigDict()
  # resnet (torchvision) | resnet_ibn_a (IBN-Net / fast-reid's ResNet-IBN-a: half of the
  # first norm of each block of layers 1-3 instance-normalised)
  c.model.backbone = "resnet"
  c.model.depth = 50
  c.model.last_stride = 1
  # Stride of the third stage: 2 (official); 1 doubles the map's side (64 px -> 8 x 8).
  c.model.layer3_stride = 2
  c.model.head = "musp"  # musp | baseline
  c.model.num_prototypes = 5  # n, the last one is background
  c.model.value_conv = "depthwise"  # depthwise (official) | full (paper)
  # c; 0 = the layout's own: the backbone's width for the depthwise conv (official),
  # width // (n - 1) for the full conv (paper text).
  c.model.value_channels = 0
  # sum | official: the official `/ h*w`, i.e. (sum / h) * w | mean (paper). At the
  # recipe's square 256x256 "sum" equals "official" exactly; "sum" stays the default
  # because a feature's scale should not depend on the aspect ratio (imports of
  # official checkpoints get "official", which reproduces them at any size).
  # normalized: the sum divided by the map's area (a departure for studying the
  # attention, README "Synthetic vehicles").
  c.model.pooling = "sum"
  c.model.ese = "all"  # all: on n parts (official) | kept: on n-1 parts (paper) | none
  c.model.ese_reduction = 16
  c.model.attention = "softmax"  # softmax | sigmoid
  c.model.global_feature = "value_mean"  # value_mean (official) | backbone_gap (paper)
  c.model.diversity = "all"  # product over all n maps (official) | kept: n-1 maps (paper)
  c.model.global_branch = True  # the official --has-global; False: n-1 part branches only
  # Departures for studying the attention (README, "Synthetic vehicles"); 1.0 = official.
  c.model.attention_init_scale = 1.0  # x the attention conv's kaiming init std
  c.model.attention_temperature = 1.0  # attention logits / T before the softmax
  c.model.attention_kernel = 3  # the attention conv's kernel: 3 (official) | 1 (own cell only)
  c.model.padding = "zeros"  # every conv and the stem's max pool: zeros (official) | circular
  c.model.dtype = "float32"  # compute dtype; bfloat16 keeps fp32 params and BN stats
  # Initial weights: a folder written by `python -m musp_jax.import_weights`, or a
  # training workdir, its checkpoints/ folder or a step folder (its latest/that step):
  # the backbone, and the head when it is the same architecture (classifiers fresh
  # when the class count differs).
  c.model.init_from = ""
  # Backbone convolutions: xla (nn.Conv; cuDNN on GPU) | gemm (matrix products,
  # models/fast_conv.py, faster on XLA's CPU backend) | auto (gemm on CPU only).
  c.model.conv_impl = "auto"

  # --- losses (losses.py) ---
  c.loss = ml_collections.ConfigDict()
  c.loss.id_weight = 1.0
  c.loss.label_smoothing = 0.1
  c.loss.triplet_weight = 1.0
  c.loss.triplet_margin = 0.3  # None -> soft margin
  c.loss.diversity_weight = 1.0

  # --- optimizer and schedule (optim.py) ---
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3.5e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # Adam epsilon, as torch.optim.Adam
  c.optim.weight_decay = 5e-4  # coupled L2 (torch.optim.Adam), not AdamW
  c.optim.wd_exclude = ""  # regex on parameter paths, e.g. "bias|scale"
  c.optim.head_lr_mult = 1.0
  c.optim.grad_clip = 0.0  # global norm; 0 = off
  c.optim.warmup_epochs = 10
  c.optim.warmup_factor = 0.1
  c.optim.milestones = (30, 60)
  c.optim.gamma = 0.1
  c.optim.num_epochs = 90

  # --- evaluation (retrieval/ranking.py, retrieval/protocols.py) ---
  c.eval = ml_collections.ConfigDict()
  # empty: the training datasets; else others (cross-domain), comma-separated
  c.eval.dataset = ""
  c.eval.test_size = "small"  # VehicleID / VERI-Wild test set: small | medium | large
  c.eval.batch_size = 128
  c.eval.every_epochs = 10
  c.eval.distance = "cam_squared"  # cam_squared (official) | cam (paper) | cosine | euclidean
  c.eval.flip = False
  c.eval.rerank = False  # k-reciprocal re-ranking, sparse and streamed (retrieval/rerank.py)
  c.eval.rerank_k1 = 20
  c.eval.rerank_k2 = 6
  c.eval.rerank_lambda = 0.3
  # Alpha query expansion of query and gallery (retrieval/query_expansion.py); the
  # defaults are fast-reid's TEST.AQE (QE_TIME, QE_K, ALPHA).
  c.eval.aqe = False
  c.eval.qe_times = 1
  c.eval.qe_k = 5
  c.eval.qe_alpha = 3.0
  c.eval.query_block = 1024  # queries per device step: one (query_block, G) block
  c.eval.vehicleid_trials = 10  # seeded random one-per-id galleries, averaged
  c.eval.vehicleid_seed = 0

  # --- driver (train.py, checkpointing.py) ---
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  # XLA's persistent compilation cache: a restart (resume, --mode=eval) skips compiling.
  c.compilation_cache_dir = "~/.cache/musp_jax/xla"  # "" = off
  return apply_variants(c, arg)


# Variant words: each is a set of overrides, applied in the order the words are given.
# Dataset configs extend the table (test sizes, synthetic sizes, their own runlocal).
VARIANTS: dict[str, dict[str, Any]] = {
    # A laptop-sized run of the same code path: ResNet-18, 128 px, one epoch.
    "runlocal": {"model.depth": 18, "input.image_size": (128, 128), "input.num_ids": 4,
                 "input.num_instances": 4, "input.num_workers": 0, "optim.num_epochs": 1,
                 "optim.warmup_epochs": 0, "eval.every_epochs": 1},
    "baseline": {"model.head": "baseline"},
    # The paper's text (docs/design.md section 1 table, right column); its value width
    # c = 2048 // (n - 1) is what value_channels=0 resolves to for the full conv.
    "paper": {"model.value_conv": "full", "model.pooling": "mean", "model.ese": "kept",
              "model.global_feature": "backbone_gap", "model.diversity": "kept",
              "eval.distance": "cam"},
    "ese_off": {"model.ese": "none"},
    "sigmoid": {"model.attention": "sigmoid"},
    "bf16": {"model.dtype": "bfloat16"},
    # fast-reid's vehicle backbone, ResNet-IBN-a (import its weights with
    # `import_weights --ibn`); depth 50 unless model.depth says 101.
    "ibn_a": {"model.backbone": "resnet_ibn_a"},
}
# The test-set sizes of VehicleID and VERI-Wild (eval.test_size).
TEST_SIZE_VARIANTS = {size: {"eval.test_size": size} for size in ("small", "medium", "large")}
MAX_PROTOTYPES = 8


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   variants: Mapping[str, Mapping[str, Any]] = VARIANTS
                   ) -> ml_collections.ConfigDict:
  """Applies comma-separated variant words, e.g. "baseline", "paper,n=3", "runlocal".

  Words are the keys of `variants`, plus n=<int> (model.num_prototypes). Unknown
  words are rejected, so a typo never trains the wrong model.
  """
  for word in filter(None, (arg or "").split(",")):
    if word.startswith("n=") and word[2:].isdigit():
      overrides = {"model.num_prototypes": int(word[2:])}
      if not 2 <= overrides["model.num_prototypes"] <= MAX_PROTOTYPES:
        raise ValueError(f"Config variant {word!r}: n must be in 2..{MAX_PROTOTYPES}.")
    elif word in variants:
      overrides = variants[word]
    else:
      raise ValueError(
          f"Unknown config variant {word!r} in {arg!r}; expected a comma-separated list "
          f"of {', '.join(variants)}, n=<int>.")
    for key, value in overrides.items():
      section, field = key.split(".")
      if field not in c[section]:  # a typo in a table must not add a field
        raise KeyError(f"Config variant {word!r} sets unknown field {key!r}.")
      c[section][field] = value
  return c
