"""folder: a re-ID dataset built from the user's own images.

    python -m musp_jax.build_dataset folder --manual_dir DIR --name NAME [--keep_junk]

then train or evaluate on it as on any other dataset, alone or with others:
`--config.dataset.name=NAME` (or `veri776,NAME`), `--config.eval.dataset=NAME`.

DIR holds the images in one of two layouts (MANUAL_DOWNLOAD_INSTRUCTIONS). The query
and gallery follow VeRi-776's protocol: a gallery image of the query's vehicle seen by
the query's own camera is junk, removed before ranking; with --keep_junk nothing is
removed (own data whose camera ids mean nothing). Queries without a countable gallery
match are reported when the dataset is built.

Each build is a dataset of its own: a builder config named NAME of this builder, in
<data_dir>/folder/NAME/<version>/, so several coexist in one data_dir. `named(NAME)`
is the builder class that holds that one config (reading a build needs no options).
"""

from __future__ import annotations

import collections
import csv
import functools
import os
import re

import tensorflow_datasets as tfds

from tfds_builders import reid_base

SPLITS = ("train", "query", "gallery")
COLUMNS = ("path", "vehicle_id", "camera_id", "split")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# A dataset's name: what configs, results and checkpoints call it.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Protocols (musp_jax/retrieval/protocols.py) a build records as its own.
PROTOCOL = "query_gallery"  # junk = same vehicle and camera, as VeRi-776
PROTOCOL_KEEP_JUNK = "query_gallery_keep_junk"

_VEHICLE_ID = re.compile(r"\d+")
_CAMERA_ID = re.compile(r"[cC]?(\d+)")


def check_name(name: str) -> str:
  """`name` if it can name a dataset, else a ValueError saying what can."""
  if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
    raise ValueError(
        f"Dataset name {name!r}: expected a lower-case letter, then lower-case letters, "
        "digits or _ (at most 64), e.g. my_city")
  return name


class Builder(reid_base.ReIdBuilder):
  """A user's own images in a folder layout or a CSV list (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = "Vehicle re-identification images of the user's own cameras."
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Pass the folder of your images as --manual_dir, and a name for the dataset as --name.
The folder holds either
  train/<vehicle id>/<camera id>_<anything>.jpg   e.g. train/0042/c003_0001.jpg
  query/<vehicle id>/<camera id>_<anything>.jpg
  gallery/<vehicle id>/<camera id>_<anything>.jpg
or one CSV file, any name, with the header `path,vehicle_id,camera_id,split` and a
line per image, e.g. `cam3/0001.jpg,42,3,train` (path relative to the CSV's folder, or
absolute; split train, query or gallery). Vehicle and camera ids are non-negative
integers (a camera may be written c003); images are .jpg, .jpeg or .png. Every split
needs at least one image. A gallery image of the query's own vehicle and camera is
junk (VeRi-776's protocol) unless the dataset is built with --keep_junk.
"""

  check_name = staticmethod(check_name)

  def __init__(self, *, keep_junk: bool = False, **kwargs):
    """keep_junk: the query/gallery protocol removes no junk (PROTOCOL_KEEP_JUNK)."""
    self._keep_junk = keep_junk
    self._where: dict[str, str] = {}
    super().__init__(**kwargs)

  @classmethod
  @functools.cache
  def named(cls, name: str) -> type[Builder]:
    """The builder of dataset `name`: this class with that one builder config."""
    check_name(name)
    return type("Builder", (cls,), {
        "name": "folder", "__module__": cls.__module__,
        "BUILDER_CONFIGS": [tfds.core.BuilderConfig(
            name=name, description=f"The user's dataset {name!r}.")]},
        skip_registration=True)

  def _protocol(self) -> str:
    return PROTOCOL_KEEP_JUNK if self._keep_junk else PROTOCOL

  def option_changes(self) -> list[str]:
    stored = self.info.metadata.get("protocol")
    if stored and stored != self._protocol():
      return [f"the protocol changed from {stored} to {self._protocol()} (--keep_junk)"]
    return []

  def _split_records(self, dl_manager) -> dict[str, list[reid_base.Record]]:
    records, self._where, layout = read_layout(os.fspath(dl_manager.manual_dir))
    self.info.metadata["protocol"] = self._protocol()
    self.info.metadata["layout"] = layout
    self.info.metadata["notes"] = unmatched_queries(
        records["query"], records["gallery"], remove_junk=not self._keep_junk)
    return records

  def _read_image(self, rec: reid_base.Record) -> bytes | None:
    try:
      return super()._read_image(rec)
    except reid_base.CorruptImageError as e:
      where = self._where.get(rec.file_name)
      if where is None:
        raise
      raise reid_base.CorruptImageError(f"{where}: {e}") from e.__cause__


def read_layout(root: str) -> tuple[dict[str, list[reid_base.Record]], dict[str, str], str]:
  """(records by split, file name -> "CSV:line" where it is listed, layout name)."""
  csvs = sorted(n for n in os.listdir(root) if n.lower().endswith(".csv")
                and not n.startswith("."))
  folders = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
  if csvs and folders:
    raise reid_base.ManualDataError(
        f"{root} holds both {csvs[0]} and split folders ({', '.join(folders)}/): expected "
        "one layout, the folders train/, query/, gallery/ or one CSV file")
  if len(csvs) > 1:
    raise reid_base.ManualDataError(
        f"{root} holds {len(csvs)} CSV files ({', '.join(csvs)}): expected one")
  if csvs:
    records, where = csv_records(os.path.join(root, csvs[0]))
    return records, where, "csv"
  return folder_records(root), {}, "folders"


def folder_records(root: str) -> dict[str, list[reid_base.Record]]:
  """The records of DIR/<split>/<vehicle id>/<camera id>_<anything>.jpg, sorted."""
  out = {}
  for split in SPLITS:
    top = os.path.join(root, split)
    if not os.path.isdir(top):
      raise reid_base.ManualDataError(
          f"Missing {top}: expected the {split} split, folders <vehicle id>/ of images "
          "<camera id>_<anything>.jpg (or one CSV file instead of the folders)")
    records = []
    for folder in sorted(os.listdir(top)):
      vdir = os.path.join(top, folder)
      if folder.startswith("."):
        continue
      if not os.path.isdir(vdir):
        raise reid_base.ManualDataError(
            f"{vdir}: expected only folders named by vehicle id in {split}/, e.g. "
            f"{split}/0042/c003_0001.jpg")
      if not _VEHICLE_ID.fullmatch(folder):
        raise reid_base.ManualDataError(
            f"{vdir}: folder name {folder!r} is not a vehicle id (a non-negative integer)")
      for name in sorted(os.listdir(vdir)):
        path = os.path.join(vdir, name)
        if name.startswith("."):
          continue
        camera = _camera_of_file(name) if os.path.isfile(path) else None
        if camera is None:
          raise reid_base.ManualDataError(
              f"{path}: expected an image named <camera id>_<anything> (.jpg, .jpeg or "
              ".png), e.g. c003_0001.jpg")
        records.append(reid_base.Record(
            path=path, file_name=f"{split}/{folder}/{name}", vehicle_id=int(folder),
            camera_id=camera))
    if not records:
      raise reid_base.ManualDataError(f"{top} holds no images: the {split} split needs "
                                      "at least one")
    out[split] = records
  return out


def _camera_of_file(name: str) -> int | None:
  stem, suffix = os.path.splitext(name)
  if suffix.lower() not in IMAGE_SUFFIXES or "_" not in stem:
    return None
  m = _CAMERA_ID.fullmatch(stem.split("_", 1)[0])
  return int(m.group(1)) if m else None


def csv_records(path: str) -> tuple[dict[str, list[reid_base.Record]], dict[str, str]]:
  """The records a CSV file `path,vehicle_id,camera_id,split` lists, sorted by path."""
  base = os.path.dirname(os.path.abspath(path))
  out: dict[str, list[reid_base.Record]] = {s: [] for s in SPLITS}
  where: dict[str, str] = {}
  with open(path, newline="", encoding="utf-8-sig") as f:
    rows = csv.reader(f)
    header = [h.strip() for h in next(rows, [])]
    if not any(header):
      raise reid_base.ManualDataError(
          f"{path}:1: expected the header {','.join(COLUMNS)}, the file is empty")
    for h in header:
      if h not in COLUMNS:
        raise reid_base.ManualDataError(
            f"{path}:1: unknown column {h!r}: expected the columns {', '.join(COLUMNS)}")
    for column in COLUMNS:
      if header.count(column) != 1:
        raise reid_base.ManualDataError(
            f"{path}:1: the header has column {column!r} {header.count(column)} times: "
            f"expected each of {', '.join(COLUMNS)} once")
    for line_no, row in enumerate(rows, 2):
      if not any(cell.strip() for cell in row):
        continue
      here = f"{path}:{line_no}"
      if len(row) != len(header):
        raise reid_base.ManualDataError(
            f"{here}: {len(row)} fields, expected {len(header)} ({','.join(header)})")
      value = dict(zip(header, (cell.strip() for cell in row)))
      record = _csv_record(value, base, here)
      if record.file_name in where:
        raise reid_base.ManualDataError(
            f"{here}: {record.file_name} is listed again (first at {where[record.file_name]})")
      where[record.file_name] = here
      out[value["split"]].append(record)
  for split in SPLITS:
    if not out[split]:
      raise reid_base.ManualDataError(
          f"{path}: no {split} rows: expected images of each split {', '.join(SPLITS)}")
    out[split].sort(key=lambda r: r.file_name)
  return out, where


def _csv_record(value: dict[str, str], base: str, here: str) -> reid_base.Record:
  if value["split"] not in SPLITS:
    raise reid_base.ManualDataError(
        f"{here}: split {value['split']!r}: expected one of {', '.join(SPLITS)}")
  if not _VEHICLE_ID.fullmatch(value["vehicle_id"]):
    raise reid_base.ManualDataError(
        f"{here}: vehicle_id {value['vehicle_id']!r}: expected a non-negative integer")
  camera = _CAMERA_ID.fullmatch(value["camera_id"])
  if camera is None:
    raise reid_base.ManualDataError(
        f"{here}: camera_id {value['camera_id']!r}: expected a non-negative integer "
        "(or c<integer>, e.g. c003)")
  name = value["path"]
  if not name or not name.lower().endswith(IMAGE_SUFFIXES):
    raise reid_base.ManualDataError(
        f"{here}: path {name!r}: expected an image file (.jpg, .jpeg or .png)")
  return reid_base.Record(
      path=os.path.join(base, name), file_name=name.replace(os.sep, "/"),
      vehicle_id=int(value["vehicle_id"]), camera_id=int(camera.group(1)))


def unmatched_queries(query: list[reid_base.Record], gallery: list[reid_base.Record], *,
                      remove_junk: bool) -> list[str]:
  """What the protocol will not count, in words: queries whose vehicle has no gallery
  image, or (junk removed) only images from the query's own camera.

  Raises ManualDataError if no query is left to count.
  """
  cameras: dict[int, set[int]] = collections.defaultdict(set)
  for r in gallery:
    cameras[r.vehicle_id].add(r.camera_id)
  absent = [q for q in query if q.vehicle_id not in cameras]
  own_camera = [q for q in query if remove_junk and cameras.get(q.vehicle_id) == {q.camera_id}]
  notes = []
  for lost, why in ((absent, "have no gallery image of their vehicle"),
                    (own_camera, "have gallery images of their vehicle only from their own "
                                 "camera, junk that the protocol removes (--keep_junk keeps "
                                 "it)")):
    if lost:
      ids = sorted({q.vehicle_id for q in lost})
      notes.append(f"{len(lost)} of {len(query)} query images ({len(ids)} vehicles, e.g. "
                   f"{', '.join(map(str, ids[:5]))}) {why}; the protocol skips them")
  if len(absent) + len(own_camera) == len(query):
    raise reid_base.ManualDataError(
        "No query image can be counted: " + "; ".join(notes) + ". Put gallery images of "
        "the query vehicles from other cameras in the gallery split.")
  return notes

