"""MUSP on VehicleID, tested on the small (800 ids) list; `:medium` / `:large` pick another.

    python -m musp_jax.main --config configs/vehicleid.py --workdir workdirs/vehicleid

Variant words of configs/common.py combine, e.g. `configs/vehicleid.py:large,baseline`.
Build the dataset first (all test sizes at once):
python -m musp_jax.build_dataset vehicle_id --manual_dir DIR
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = "vehicle_id"
  c.dataset.builder_config = ""
  return common.apply_variants(c, arg, {**common.VARIANTS, **common.TEST_SIZE_VARIANTS})
