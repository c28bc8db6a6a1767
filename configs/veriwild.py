"""MUSP on VERI-Wild, tested on the small (3,000 ids) set; `:medium` / `:large` pick another.

    python -m musp_jax.main --config configs/veriwild.py --workdir workdirs/veriwild

Variant words of configs/common.py combine, e.g. `configs/veriwild.py:large,paper`.
Build the dataset first (all test sizes at once):
python -m musp_jax.build_dataset veri_wild --manual_dir DIR
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "veri_wild"
  c.dataset.builder_config = ""
  return common.apply_variants(c, arg, {**common.VARIANTS, **common.TEST_SIZE_VARIANTS})
