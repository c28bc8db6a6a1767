"""MUSP on VeRi-776 with the official recipe (docs/design.md sections 3-5).

    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776

Variants by argument, e.g. `configs/veri776.py:baseline`, `:paper`, `:n=3`, `:ese_off`,
`:sigmoid`, `:bf16`; `:runlocal` shrinks everything for a laptop (configs/common.py).
Build the dataset first: python -m musp_jax.build_dataset veri776 --manual_dir DIR
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "veri776"
  c.dataset.builder_config = ""
  return common.apply_variants(c, arg)
