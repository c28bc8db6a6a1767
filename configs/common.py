"""The official MUSP recipe (SPEC sections 1-4); dataset configs override a few fields.

    python -m musp_jax.main --config configs/common.py --workdir workdirs/common

Dataset configs call `get_config()` and change what differs; they never copy it.
The config is locked: `--config.model.nmu=3` fails with the unknown key named.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The recipe; `arg` takes the variant words of apply_variants."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- data (tfds_builders/, musp_jax/datasets.py) ---
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic_vehicles"  # veri776 | vehicle_id | veri_wild | synthetic_vehicles
  c.dataset.builder_config = "small"  # test size / synthetic size
  c.dataset.data_dir = "~/tensorflow_datasets"
  c.dataset.manual_dir = ""  # only needed to build a licensed dataset

  # --- input pipeline (sampling.py, augment.py, input_pipeline.py) ---
  c.input = ml_collections.ConfigDict()
  c.input.image_size = (256, 256)
  c.input.num_ids = 16  # P identities per batch
  c.input.num_instances = 4  # K images per identity
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
  c.model.depth = 50
  c.model.last_stride = 1
  c.model.head = "musp"  # musp | baseline
  c.model.num_prototypes = 5  # n, the last one is background
  c.model.value_conv = "depthwise"  # depthwise (official) | full (paper)
  c.model.value_channels = 2048  # c; paper text: 2048 // (n - 1)
  # sum | official: the official `/ h*w`, i.e. (sum / h) * w | mean (paper). At the
  # recipe's square 256x256 "sum" equals "official" exactly; "sum" stays the default
  # because a feature's scale should not depend on the aspect ratio (imports of
  # official checkpoints get "official", which reproduces them at any size).
  c.model.pooling = "sum"
  c.model.ese = "all"  # all: on n parts (official) | kept: on n-1 parts (paper) | none
  c.model.ese_reduction = 16
  c.model.attention = "softmax"  # softmax | sigmoid
  c.model.global_feature = "value_mean"  # value_mean (official) | backbone_gap (paper)
  c.model.diversity = "all"  # product over all n maps (official) | kept: n-1 maps (paper)
  c.model.global_branch = True  # the official --has-global; False: n-1 part branches only
  c.model.dtype = "float32"  # compute dtype; bfloat16 keeps fp32 params and BN stats
  c.model.init_from = ""  # Orbax dir written by `python -m musp_jax.import_weights`
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

  # --- evaluation (retrieval.py, protocols.py) ---
  c.eval = ml_collections.ConfigDict()
  c.eval.dataset = ""  # empty: the training dataset; else another (cross-domain)
  c.eval.builder_config = ""
  c.eval.batch_size = 128
  c.eval.every_epochs = 10
  c.eval.distance = "cam_squared"  # cam_squared (official) | cam (paper) | cosine | euclidean
  c.eval.flip = False
  c.eval.rerank = False
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


SIZES = ("small", "medium", "large")


def apply_variants(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies comma-separated variant words, e.g. "baseline", "paper,n=3", "runlocal".

  Words: runlocal, baseline, paper, ese_off, sigmoid, bf16, n=<int>, and a test size
  (small/medium/large) for datasets that have several. Unknown words are rejected, so
  a typo never trains the wrong model.
  """
  paper = False
  for word in filter(None, (arg or "").split(",")):
    if word == "runlocal":
      # A laptop-sized run of the same code path: ResNet-18, 128 px, one epoch.
      c.model.depth = 18
      c.input.image_size = (128, 128)
      c.input.num_ids, c.input.num_instances = 4, 4
      c.input.num_workers = 0
      c.optim.num_epochs = 1
      c.optim.warmup_epochs = 0
      c.eval.every_epochs = 1
    elif word in SIZES:
      c.dataset.builder_config = word
    elif word == "baseline":
      c.model.head = "baseline"
    elif word == "paper":
      # The paper's text (SPEC section 1 table, right column).
      paper = True
      c.model.value_conv = "full"
      c.model.pooling = "mean"
      c.model.ese = "kept"
      c.model.global_feature = "backbone_gap"
      c.model.diversity = "kept"
      c.eval.distance = "cam"
    elif word == "ese_off":
      c.model.ese = "none"
    elif word == "sigmoid":
      c.model.attention = "sigmoid"
    elif word == "bf16":
      c.model.dtype = "bfloat16"
    elif word.startswith("n="):
      n = int(word[2:])
      if not 2 <= n <= 8:
        raise ValueError(f"Config variant {word!r}: n must be in 2..8.")
      c.model.num_prototypes = n
    else:
      raise ValueError(
          f"Unknown config variant {word!r} in {arg!r}; expected a comma-separated list of "
          "runlocal, baseline, paper, ese_off, sigmoid, bf16, n=<int>, small/medium/large.")
  # The value map has the backbone's width; the paper's text splits it over the parts.
  width = 2048 if c.model.depth >= 50 else 512
  c.model.value_channels = width // (c.model.num_prototypes - 1) if paper else width
  return c
