"""MUSP on a dataset of your own images, with the official recipe.

    python -m musp_jax.main --config configs/own.py --config.dataset.name=my_city \
        --workdir workdirs/my_city

after building the dataset once:

    python -m musp_jax.build_dataset folder --manual_dir DIR --name my_city

DIR holds train/, query/ and gallery/ folders of <vehicle id>/<camera id>_<anything>.jpg,
or one CSV file `path,vehicle_id,camera_id,split` (tfds_builders/folder). dataset.name
may list several, e.g. veri776,my_city. Start from ImageNet weights with
--config.model.init_from (python -m musp_jax.import_weights). Variant words of
configs/common.py combine, e.g. `configs/own.py:baseline`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_config()
  c.dataset.name = ""  # required: --config.dataset.name=NAME
  c.dataset.builder_config = ""
  return common.apply_variants(c, arg)
