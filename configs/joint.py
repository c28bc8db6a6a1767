"""MUSP on VeRi-776, VehicleID and VERI-Wild at once, evaluated on each.

    python -m musp_jax.main --config configs/joint.py --workdir workdirs/joint

The three training sets are one: labels offset per dataset, so no two share one
(576 + 13,164 + 30,671 = 44,411 classes), PK batches drawn over the union (`:balanced`:
a fixed share of each batch from every dataset). Results hold a block of rows per
dataset (VehicleID and VERI-Wild at eval.test_size: `:medium`, `:large`). Variant words
of configs/common.py combine, e.g. `configs/joint.py:balanced,baseline`. Your own data
joins with --config.dataset.name=veri776,vehicle_id,veri_wild,NAME (build_dataset
folder). Build each dataset first: python -m musp_jax.build_dataset NAME --manual_dir DIR
"""

from configs import common

VARIANTS = {**common.VARIANTS, **common.TEST_SIZE_VARIANTS,
            "balanced": {"input.balance_datasets": True}}


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "veri776,vehicle_id,veri_wild"
  c.dataset.builder_config = ""
  return common.apply_variants(c, arg, VARIANTS)
