"""What each split of a synthetic vehicle set holds: identities, cameras and images.

The TFDS builder (synthetic_vehicles_dataset_builder.py) writes these records, and the
soft-partition study (scripts/ablation.py --runner core) renders the same ones in memory
(`render_set`) where TensorFlow is not installed: both draw every image with `scenes`,
so the study trains and scores on the bytes the builder stores. numpy and the renderer
only.

Splits like VeRi-776: `train` identities, and disjoint test identities split into
`query` (one or two images per identity, from different cameras) and `gallery` (the
rest). How identities are drawn (`SetSpec.identities`):
  random    every attribute at random; several identities share a (body, colour)
            model by chance (the sets tiny, small, large)
  parts     groups of `group_size` consecutive identities share body and paint
            exactly and differ only in their parts, so that a feature of the whole
            vehicle's look cannot tell a group apart (the set `parts`)
  pretrain  at random, none equal (same attributes) to an identity of any other named
            set: a set to pretrain a backbone on before training on another one, as
            ImageNet weights are for the licensed datasets (the set `pretrain`)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from tfds_builders.synthetic_vehicles import render

IDENTITIES = ("random", "parts", "pretrain")
_PART_RADIX = (render.NUM_ROOF, render.NUM_LAMP, render.NUM_WHEEL, render.NUM_STICKER,
               render.NUM_STRIPE)


@dataclasses.dataclass(kw_only=True)
class SetSpec:
  """A synthetic set: its size, cameras, image heights, seed and identities."""
  num_train_ids: int = 16
  num_test_ids: int = 12
  images_per_id: int = 8
  num_cameras: int = 6
  # Each image draws its height in between; its width follows the view (render.py).
  height_range: tuple[int, int] = (112, 160)
  # The share of the crop the vehicle spans (render.render's fill_range).
  fill_range: tuple[float, float] = render.TIGHT_FILL
  seed: int = 0
  identities: str = "random"  # one of IDENTITIES
  group_size: int = 0  # identities per (body, paint) group, for identities="parts"


# The named sets (the builder's configs): name -> (description, spec).
SETS: dict[str, tuple[str, SetSpec]] = {
    "tiny": ("Tests: 192 images, builds in seconds.",
             SetSpec(num_train_ids=16, num_test_ids=12, images_per_id=8, num_cameras=6)),
    "small": ("CPU demo: 1,500 images.",
              SetSpec(num_train_ids=100, num_test_ids=50, images_per_id=10, num_cameras=8)),
    "large": ("24,000 images, 20 cameras.",
              SetSpec(num_train_ids=1000, num_test_ids=500, images_per_id=16,
                      num_cameras=20)),
    "parts": ("Parts decide identity: groups of 10 identities share body and paint and "
              "differ only in roof item, lamps, wheels, sticker and stripe; 2,000 images.",
              SetSpec(num_train_ids=150, num_test_ids=50, images_per_id=10, num_cameras=8,
                      identities="parts", group_size=10)),
    # The parts set's identities and images with loose crops: the vehicle spans 40-95%
    # of the limiting side and sits anywhere in the rest, so where a part is in the
    # frame changes from image to image and a fixed grid of maps cannot follow it.
    "parts_loose": ("The parts set with loose crops: the vehicle spans 40-95% of the "
                    "frame's limiting side, anywhere in it; 2,000 images.",
                    SetSpec(num_train_ids=150, num_test_ids=50, images_per_id=10,
                            num_cameras=8, identities="parts", group_size=10,
                            fill_range=(0.4, 0.95))),
    # Few identities with many images each: an identity turns up in a 32-image PK batch
    # every 25 steps (with 1,000 identities of 8 images, every 125: in 1,000 steps the
    # identity loss did not move from log(1000)).
    "pretrain": ("Pretraining: 200 identities none of which is in another set; "
                 "8,400 images seen by 20 other cameras.",
                 SetSpec(num_train_ids=200, num_test_ids=10, images_per_id=40,
                         num_cameras=20, seed=1, identities="pretrain")),
}


class Scene(NamedTuple):
  """One rendered image of a split and what the builder stores with it."""
  file_name: str
  vehicle_id: int
  camera_id: int  # 1-based like VeRi's c001
  metadata: dict[str, int]
  image: bytes  # JPEG
  part_mask: bytes  # PNG label map (render.PART_CLASSES)


def part_code(ident: render.Identity) -> int:
  """The identity's part details as one integer (mixed radix)."""
  code = 0
  for digit, radix in zip((ident.roof, ident.lamp, ident.wheel, ident.sticker, ident.stripe),
                          _PART_RADIX):
    code = code * radix + digit
  return code


def identities(spec: SetSpec) -> list[render.Identity]:
  """The identities of vehicle ids 1..num_train_ids + num_test_ids, in order."""
  count = spec.num_train_ids + spec.num_test_ids
  if spec.identities == "random":
    return render.make_identities(spec.seed, count)
  if spec.identities == "parts":
    if spec.num_train_ids % max(spec.group_size, 1):
      raise ValueError(f"num_train_ids={spec.num_train_ids} must be a multiple of "
                       f"group_size={spec.group_size}: a group is all train or all test.")
    return render.make_part_groups(spec.seed, count, spec.group_size)
  if spec.identities == "pretrain":
    return render.make_identities_except(spec.seed, count, other_set_codes())
  raise ValueError(f"identities={spec.identities!r}; expected one of {IDENTITIES}.")


def other_set_codes() -> list[int]:
  """The identity codes of every named set that is not a pretraining set."""
  codes = set()
  for _, spec in SETS.values():
    if spec.identities != "pretrain":
      codes.update(render.identity_code(i) for i in identities(spec))
  return sorted(codes)


def camera_set(seed: int, vehicle_id: int, num_cameras: int) -> list[int]:
  """The cameras (0-based) that see an identity: 2 to 5 of them, fixed by the seed."""
  rng = np.random.default_rng([seed, 17, vehicle_id])
  k = int(rng.integers(2, min(5, num_cameras) + 1))
  return [int(c) for c in rng.choice(num_cameras, size=k, replace=False)]


def is_query(j: int, cams: list[int]) -> bool:
  # Image j is seen by cams[j % len(cams)]: j = 0 is the first camera's first image,
  # j = 1 the second camera's (only when a third camera leaves gallery matches).
  return j == 0 or (j == 1 and len(cams) >= 3)


def _keep_all(j: int, cams: list[int]) -> bool:
  del j, cams
  return True


def _is_gallery(j: int, cams: list[int]) -> bool:
  return not is_query(j, cams)


# Which images of a test identity each split holds: one query from the first camera, a
# second from the next when there are 3+; the rest is the gallery.
KEEP = {"train": _keep_all, "query": is_query, "gallery": _is_gallery}


def split_vehicle_ids(spec: SetSpec, split: str) -> range:
  """The vehicle ids of a split: 1..num_train_ids for train, the next num_test_ids for
  query and gallery."""
  if split == "train":
    return range(1, spec.num_train_ids + 1)
  return range(spec.num_train_ids + 1, spec.num_train_ids + spec.num_test_ids + 1)


def split_scenes(spec: SetSpec) -> dict[str, Iterator[Scene]]:
  """The images of each split (train, query, gallery), rendered as they are iterated."""
  return {split: scenes(spec, split_vehicle_ids(spec, split), keep)
          for split, keep in KEEP.items()}


def render_split(spec: SetSpec, split: str, vehicle_ids: Sequence[int]) -> list[Scene]:
  """The images of `split` of some of its vehicle ids (a share of a parallel render)."""
  return list(scenes(spec, vehicle_ids, KEEP[split]))


def render_set(name: str, *, workers: int | None = None) -> dict[str, list[Scene]]:
  """Every split of the named set (SETS), rendered in memory by `workers` processes
  (default: one per core): the records the builder writes, in its order."""
  if name not in SETS:
    raise ValueError(f"dataset.builder_config={name!r}: expected one of "
                     f"{', '.join(SETS)} (tfds_builders/synthetic_vehicles/scenes.py).")
  spec = SETS[name][1]
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    return {split: render_split(spec, split, split_vehicle_ids(spec, split)) for split in KEEP}
  out = {}
  # Spawned workers import numpy, PIL and the renderer only.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    for split in KEEP:
      vids = list(split_vehicle_ids(spec, split))
      chunk = max(1, math.ceil(len(vids) / (4 * workers)))
      parts = pool.map(functools.partial(render_split, spec, split),
                       [vids[i:i + chunk] for i in range(0, len(vids), chunk)])
      out[split] = [scene for part in parts for scene in part]
  return out


def scenes(spec: SetSpec, vehicle_ids: Sequence[int], keep) -> Iterator[Scene]:
  """The images j of each vehicle id for which keep(j, its cameras) holds, in order.

  Each image is a pure function of (seed, vehicle id, j): any subset, in any order and
  in any process, gives the same bytes.
  """
  idents = identities(spec)
  cameras = render.make_cameras(spec.seed, spec.num_cameras)
  for vid in vehicle_ids:
    ident = idents[vid - 1]
    cams = camera_set(spec.seed, vid, spec.num_cameras)
    for j in range(spec.images_per_id):
      if not keep(j, cams):
        continue
      cam = cams[j % len(cams)]
      rng = render.image_rng(spec.seed, vid, j)
      height = int(rng.integers(spec.height_range[0], spec.height_range[1] + 1))
      out = render.render(ident, cameras[cam], rng, height=height,
                          fill_range=tuple(spec.fill_range))
      yield Scene(
          file_name=f"{vid:04d}_c{cam + 1:03d}_{j:04d}.jpg",
          vehicle_id=vid,
          camera_id=cam + 1,
          metadata={"color": ident.color, "type": ident.body, "parts": part_code(ident),
                    "view": out.view},
          image=render.encode_jpeg(out.image),
          part_mask=render.encode_mask(out.mask))
