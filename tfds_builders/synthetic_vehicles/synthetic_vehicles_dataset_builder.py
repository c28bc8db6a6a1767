"""synthetic_vehicles: rendered vehicle re-ID data that needs no download.

Build (the training driver also builds it on first use):

    python -m musp_jax.build_dataset synthetic_vehicles --config small

Splits like VeRi-776: `train` identities, and disjoint test identities split into `query`
(one or two images per identity, from different cameras) and `gallery` (the rest).
Besides the re-ID fields every record holds `part_mask`, the image's ground-truth label
map (PNG, one channel, values index render.PART_CLASSES), and its view in `metadata`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import reid_base
from tfds_builders.synthetic_vehicles import render

_PART_RADIX = (render.NUM_ROOF, render.NUM_LAMP, render.NUM_WHEEL, render.NUM_STICKER,
               render.NUM_STRIPE)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train_ids: int = 16
  num_test_ids: int = 12
  images_per_id: int = 8
  num_cameras: int = 6
  # Each image draws its height in between; its width follows the view (render.py).
  height_range: tuple[int, int] = (112, 160)
  seed: int = 0


def part_code(ident: render.Identity) -> int:
  """The identity's part details as one integer (mixed radix)."""
  code = 0
  for digit, radix in zip((ident.roof, ident.lamp, ident.wheel, ident.sticker, ident.stripe),
                          _PART_RADIX):
    code = code * radix + digit
  return code


class Builder(reid_base.ReIdBuilder):
  """Procedurally rendered vehicles (tfds_builders/synthetic_vehicles/render.py)."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "Front, rear and side views; tight detector-like crops whose width follows "
               "the view; ground-truth part masks (`part_mask`) and the view in metadata.",
  }
  BUILDER_CONFIGS = [
      SyntheticConfig(name="tiny", description="Tests: 192 images, builds in seconds.",
                      num_train_ids=16, num_test_ids=12, images_per_id=8, num_cameras=6),
      SyntheticConfig(name="small", description="CPU demo: 1,500 images.",
                      num_train_ids=100, num_test_ids=50, images_per_id=10, num_cameras=8),
      SyntheticConfig(name="large", description="24,000 images, 20 cameras.",
                      num_train_ids=1000, num_test_ids=500, images_per_id=16,
                      num_cameras=20),
  ]
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
    cfg = self.builder_config
    train_ids = range(1, cfg.num_train_ids + 1)
    test_ids = range(cfg.num_train_ids + 1, cfg.num_train_ids + cfg.num_test_ids + 1)
    return {
        "train": self._records(train_ids, lambda j, cams: True),
        # One query from the first camera, a second from the next when there are 3+.
        "query": self._records(test_ids, _is_query),
        "gallery": self._records(test_ids, lambda j, cams: not _is_query(j, cams)),
    }

  def _records(self, vehicle_ids, keep) -> Iterator[reid_base.Record]:
    cfg = self.builder_config
    identities = render.make_identities(cfg.seed, cfg.num_train_ids + cfg.num_test_ids)
    cameras = render.make_cameras(cfg.seed, cfg.num_cameras)
    for vid in vehicle_ids:
      ident = identities[vid - 1]
      cams = camera_set(cfg.seed, vid, cfg.num_cameras)
      for j in range(cfg.images_per_id):
        if not keep(j, cams):
          continue
        cam = cams[j % len(cams)]
        rng = render.image_rng(cfg.seed, vid, j)
        height = int(rng.integers(cfg.height_range[0], cfg.height_range[1] + 1))
        out = render.render(ident, cameras[cam], rng, height=height)
        yield reid_base.Record(
            path=None,
            file_name=f"{vid:04d}_c{cam + 1:03d}_{j:04d}.jpg",
            vehicle_id=vid,
            camera_id=cam + 1,  # 1-based like VeRi's c001
            metadata={"color": ident.color, "type": ident.body, "parts": part_code(ident),
                      "view": out.view},
            image=render.encode_jpeg(out.image),
            extra={"part_mask": render.encode_mask(out.mask)})


def camera_set(seed: int, vehicle_id: int, num_cameras: int) -> list[int]:
  """The cameras (0-based) that see an identity: 2 to 5 of them, fixed by the seed."""
  rng = np.random.default_rng([seed, 17, vehicle_id])
  k = int(rng.integers(2, min(5, num_cameras) + 1))
  return [int(c) for c in rng.choice(num_cameras, size=k, replace=False)]


def _is_query(j: int, cams: list[int]) -> bool:
  # Image j is seen by cams[j % len(cams)]: j = 0 is the first camera's first image,
  # j = 1 the second camera's (only when a third camera leaves gallery matches).
  return j == 0 or (j == 1 and len(cams) >= 3)
