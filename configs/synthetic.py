"""MUSP on the synthetic vehicle dataset: the CPU demo, no download needed.

    python -m musp_jax.main --config configs/synthetic.py --workdir workdirs/demo

The dataset is rendered and built on first use. A ResNet-18 at 64 px trains from random
weights in about five minutes on a 2-core CPU (10 epochs, 320 steps). There are no
ImageNet weights to start from and the run is short, so the learning rate is 3e-3 rather
than the recipe's 3.5e-4 (tuned for imported weights) and stays there for 9 of the 10
epochs: after 8 epochs at 1e-3 with a decay at epoch 6 the model was still far from
fitting the training identities (README, "Synthetic vehicles"). `:runlocal` uses the tiny
dataset (tests); `:tiny` / `:small` / `:large` pick the dataset size, `:parts` the set in
which only parts tell identities apart (`:parts_loose`: the same with loose crops);
`:pretrain` trains a backbone on the pretraining set for `--config.model.init_from` (a
workdir), `:study` is the optimiser of the soft-partition study (from such a backbone);
variant words of configs/common.py combine, e.g. `configs/synthetic.py:baseline`.
"""

from configs import common

VARIANTS = {
    **common.VARIANTS,
    "runlocal": {**common.VARIANTS["runlocal"], "dataset.builder_config": "tiny",
                 "input.image_size": (64, 64)},
    **{size: {"dataset.builder_config": size} for size in ("tiny", "small", "large", "parts",
                                                            "parts_loose")},
    # A backbone for model.init_from, as ImageNet weights are for the licensed datasets:
    # the baseline trained on 200 identities that are in no other set (scenes.SETS).
    "pretrain": {"dataset.builder_config": "pretrain", "model.head": "baseline",
                 "optim.num_epochs": 4, "optim.milestones": (3,)},
    # The soft-partition study starts from that backbone (scripts/ablation.py
    # --pretrain_scale): the recipe's lr 3.5e-4 for pretrained weights instead of the
    # demo's 3e-3, the new head at 10x (the best probe: README, "Synthetic vehicles").
    "study": {"optim.lr": 3.5e-4, "optim.head_lr_mult": 10.0},
}


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "synthetic_vehicles"
  c.dataset.builder_config = "small"
  c.model.depth = 18
  c.input.image_size = (64, 64)
  c.input.num_ids, c.input.num_instances = 8, 4
  c.input.num_workers = 2
  c.optim.lr = 3e-3
  c.optim.num_epochs = 10
  c.optim.warmup_epochs = 1
  c.optim.milestones = (9,)
  c.eval.every_epochs = 10
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  return common.apply_variants(c, arg, VARIANTS)
