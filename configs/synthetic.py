"""MUSP on the synthetic vehicle dataset: the CPU demo, no download needed.

    python -m musp_jax.main --config configs/synthetic.py --workdir workdirs/demo

The dataset is rendered and built on first use. A ResNet-18 at 64 px trains from random
weights in about four minutes on a 2-core CPU. There are no ImageNet weights to start
from, so the learning rate is 1e-3 rather than the recipe's 3.5e-4 (tuned for imported
weights) and the schedule is compressed to 8 epochs. `:runlocal` uses the tiny dataset
(tests); `:tiny` / `:small` / `:large` pick the dataset size; variant words of
configs/common.py combine, e.g. `configs/synthetic.py:baseline`.
"""

from configs import common

VARIANTS = {
    **common.VARIANTS,
    "runlocal": {**common.VARIANTS["runlocal"], "dataset.builder_config": "tiny",
                 "input.image_size": (64, 64)},
    **{size: {"dataset.builder_config": size} for size in ("tiny", "small", "large")},
}


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "synthetic_vehicles"
  c.dataset.builder_config = "small"
  c.model.depth = 18
  c.input.image_size = (64, 64)
  c.input.num_ids, c.input.num_instances = 8, 4
  c.input.num_workers = 2
  c.optim.lr = 1e-3
  c.optim.num_epochs = 8
  c.optim.warmup_epochs = 1
  c.optim.milestones = (6,)
  c.eval.every_epochs = 8
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  return common.apply_variants(c, arg, VARIANTS)
