"""synthetic_vehicles: rendered vehicle re-ID data that needs no download.

Build (the training driver also builds it on first use):

    python -m musp_jax.build_dataset synthetic_vehicles --config small

Splits like VeRi-776: `train` identities, and disjoint test identities split into `query`
(one or two images per identity, from different cameras) and `gallery` (the rest); what
each config holds (sizes, cameras, how identities are drawn) is scenes.SETS. Besides
the re-ID fields every record holds `part_mask`, the image's ground-truth label map (PNG,
one channel, values index render.PART_CLASSES), and its view in `metadata`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import reid_base
from tfds_builders.synthetic_vehicles import render
from tfds_builders.synthetic_vehicles import scenes


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig, scenes.SetSpec):
  """A builder config is a named scenes.SetSpec (its fields are keyword arguments)."""


class Builder(reid_base.ReIdBuilder):
  """Procedurally rendered vehicles (tfds_builders/synthetic_vehicles/render.py)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "Front, rear and side views; tight detector-like crops whose width follows "
               "the view; ground-truth part masks (`part_mask`) and the view in metadata.",
  }
  BUILDER_CONFIGS = [
      SyntheticConfig(name=name, description=description, **dataclasses.asdict(spec))
      for name, (description, spec) in scenes.SETS.items()]
  DEFAULT_CONFIG_NAME = "small"
  METADATA_FEATURES = {"color": np.int64, "type": np.int64, "parts": np.int64,
                       "view": np.int64}
  EXTRA_FEATURES = {
      # Stored as the PNG bytes render.encode_mask writes; read undecoded like the image.
      "part_mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
  }
  # What the values of part_mask mean (musp_jax.data.datasets.part_classes).
  PART_CLASSES = render.PART_CLASSES
  DESCRIPTION = (
      "Rendered vehicles seen from the front, rear or side: identities share body shape "
      "and colour in groups and differ in part details; images vary view, pose, scale, "
      "lighting, clutter, blur, occlusion and a per-camera colour cast. Each image has a "
      "ground-truth label map of background, body and part families.")

  def _train_vehicle_ids(self, records) -> list[int]:
    return list(range(1, self.builder_config.num_train_ids + 1))

  def _split_records(self, dl_manager) -> dict[str, Iterator[reid_base.Record]]:
    del dl_manager  # nothing to download
    return {split: map(_record, images)
            for split, images in scenes.split_scenes(self.builder_config).items()}

  def _records(self, vehicle_ids, keep) -> Iterator[reid_base.Record]:
    return map(_record, scenes.scenes(self.builder_config, vehicle_ids, keep))


def _record(scene: scenes.Scene) -> reid_base.Record:
  return reid_base.Record(path=None, file_name=scene.file_name,
                          vehicle_id=scene.vehicle_id, camera_id=scene.camera_id,
                          metadata=scene.metadata, image=scene.image,
                          extra={"part_mask": scene.part_mask})
