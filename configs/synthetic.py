"""MUSP on the synthetic vehicle dataset: the CPU demo, no download needed.

    python -m musp_jax.main --config configs/synthetic.py --workdir workdirs/demo

The dataset is rendered and built on first use. A ResNet-18 at 128 px trains from random
weights in a few minutes on a 2-core CPU. `:runlocal` uses the tiny dataset (tests);
variant words of configs/common.py combine, e.g. `configs/synthetic.py:baseline`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "synthetic_vehicles"
  c.dataset.builder_config = "small"
  c.model.depth = 18
  c.input.image_size = (128, 128)
  c.input.num_ids, c.input.num_instances = 8, 4
  c.input.num_workers = 2
  c.optim.num_epochs = 12
  c.optim.warmup_epochs = 2
  c.optim.milestones = (8, 11)
  c.eval.every_epochs = 6
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c = common.apply_variants(c, arg)
  if "runlocal" in (arg or "").split(","):
    c.dataset.builder_config = "tiny"
  return c
