r"""Builds a re-ID dataset into array_record files (no apache_beam needed).

    python -m musp_jax.build_dataset veri776 --manual_dir ~/data/VeRi
    python -m musp_jax.build_dataset vehicle_id --manual_dir ~/data/VehicleID
    python -m musp_jax.build_dataset veri_wild --manual_dir ~/data/VERI-Wild
    python -m musp_jax.build_dataset synthetic_vehicles --config small
    python -m musp_jax.build_dataset folder --manual_dir ~/data/my_city --name my_city

VehicleID and VERI-Wild are built once with every test list the download holds
(evaluation picks one with eval.test_size).

`folder` builds a dataset of your own images, named by --name: DIR holds train/,
query/ and gallery/ folders of <vehicle id>/<camera id>_<anything>.jpg, or one CSV
file `path,vehicle_id,camera_id,split` (tfds_builders/folder). Train and evaluate on it
with --config.dataset.name=NAME, alone or beside others (veri776,NAME). Its protocol is
VeRi-776's (a gallery image of the query's vehicle and camera is junk) unless built
with --keep_junk; queries the protocol cannot count are reported.

Unreadable images are skipped and counted (--strict stops at the first one). A failed
build leaves nothing that reads as complete; run the command again. Run again on a
built dataset, the command rebuilds it if the manual folder changed since (a list
edited, an image added, replaced or removed), or with --rebuild; the old build stays
until the new one is complete.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from musp_jax.data import datasets
from musp_jax.runtime import cli

_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "Folder of the manual download (licensed datasets).")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Output folder.")
_CONFIG = flags.DEFINE_string(
    "config", None, "Builder config of synthetic_vehicles: tiny/small/large (default "
    "small); the other datasets have none.")
_NAME = flags.DEFINE_string(
    "name", None, "folder: the name of the dataset (dataset.name in configs), e.g. my_city.")
_KEEP_JUNK = flags.DEFINE_bool(
    "keep_junk", False, "folder: evaluate without removing a gallery image of the "
    "query's own vehicle and camera (VeRi-776's junk).")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on the first unreadable image.")
_REBUILD = flags.DEFINE_bool("rebuild", False, "Build again even if the manual folder "
                             "has not changed since the last build.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.")


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2 or argv[1] not in datasets.DATASETS:
    cli.usage_error(
        f"give one dataset name: {' | '.join(datasets.DATASETS)} (got {argv[1:]}).")
  named = datasets.spec(argv[1]).named_builds
  if named and not _NAME.value:
    cli.usage_error(f"{argv[1]} needs --name: the name of your dataset, e.g. my_city.")
  for flag, value in (("name", _NAME.value), ("keep_junk", _KEEP_JUNK.value)):
    if value and not named:
      cli.usage_error(f"--{flag} is only for {datasets.NAMED_BUILDS} (your own images).")
  if named and _CONFIG.value is not None:
    cli.usage_error(f"--config is not for {argv[1]}; name the dataset with --name.")
  return cli.run(lambda: _build_and_report(argv[1]), verbose=_VERBOSE.value)


def _build_and_report(name: str) -> None:
  """Builds dataset `name` as the flags say and prints what was built."""
  config, options = _CONFIG.value, {}
  if datasets.spec(name).named_builds:
    config = datasets.check_user_dataset_name(_NAME.value)
    options = {"keep_junk": _KEEP_JUNK.value}
  elif config is None:  # the builder's default config, if it has configs
    names = datasets.config_names(name)
    config = datasets.builder_class(name).DEFAULT_CONFIG_NAME if names else ""
  shown = datasets.display_name(name, config)
  tfds.display_progress_bar(True)
  report = datasets.build(name, data_dir=_DATA_DIR.value, builder_config=config,
                          manual_dir=_MANUAL_DIR.value, strict=_STRICT.value,
                          rebuild=_REBUILD.value, options=options)
  if report.rebuilt_because:
    print(f"Rebuilt {shown}, replacing the last build: {'; '.join(report.rebuilt_because)}.")
  if report.note:
    print(f"note: {report.note}")
  sizes = ", ".join(f"{s}: {n}" for s, n in sorted(report.num_examples.items()))
  print(f"Built {shown} in {report.path} ({sizes}).")
  if report.skipped:
    print(f"Skipped {len(report.skipped)} unreadable images, e.g. "
          f"{', '.join(report.skipped[:5])}.")
  for finding in report.findings:
    print(f"note: {finding}.")
  if datasets.spec(name).named_builds:
    print(f"Train or evaluate on it with --config.dataset.name={config} "
          f"--config.dataset.data_dir={_DATA_DIR.value} (beside others: "
          f"--config.dataset.name=veri776,{config}).")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
