"""What every re-ID builder shares: features, labels, the split index, image checks.

Each dataset builder (tfds_builders/<name>/<name>_dataset_builder.py) lists its records
per split; this base writes them in that order (shuffling off, integer keys), so record
i of a split is entry i of the split index kept in `info.metadata["index"]`. The index
lets training read labels and cameras for a whole split without touching the images.
A build from a manual download also records `manual_fingerprint` (the lists' contents,
the other files' sizes), so a later build command can tell that the folder changed.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import os
from typing import Any, Iterable, Iterator, Mapping

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

INDEX_KEYS = ("label", "vehicle_id", "camera_id")
# Files of a manual download whose content the fingerprint hashes (lists, labels);
# of the others (images) it records paths and sizes.
_LIST_SUFFIXES = (".txt", ".xml", ".csv", ".json")
_MAX_HASHED_BYTES = 64 * 2**20


class ManualDataError(FileNotFoundError):
  """A manual-download folder lacks a file or folder, or a list file is malformed."""


class CorruptImageError(OSError):
  """An image could not be read or decoded (raised only in strict builds)."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a split, before it is read."""

  path: str | None  # image file on disk; None when `image` holds the bytes
  file_name: str  # path relative to the manual folder (or a synthetic name)
  vehicle_id: int
  camera_id: int = -1
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  image: bytes | None = None
  # Values of the builder's EXTRA_FEATURES (e.g. an encoded label map), by feature name.
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def require(path: os.PathLike | str, what: str, instructions: str) -> str:
  """Returns `path` if it exists, else raises ManualDataError naming it and what it holds."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ManualDataError(
        f"Missing {path}: expected {what}.\n\n"
        f"Manual download instructions:\n{instructions}")
  return path


def read_list(path: str, what: str, instructions: str) -> list[list[str]]:
  """Reads a whitespace-separated list file, skipping blank lines; empty is an error."""
  require(path, what, instructions)
  with open(path, encoding="utf-8", errors="replace") as f:
    rows = [line.split() for line in f if line.strip()]
  if not rows:
    raise ManualDataError(f"{path} is empty: expected {what}.")
  return rows


def manual_fingerprint(manual_dir: str) -> dict[str, Any]:
  """What a build reads from its manual folder: a hash of each list or label file and
  the paths and sizes of all other files (images are not read: a stat each)."""
  lists, digest, count, total = {}, hashlib.sha1(), 0, 0
  for folder, subfolders, names in os.walk(manual_dir):
    subfolders.sort()
    for name in sorted(names):
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, manual_dir).replace(os.sep, "/")
      size = os.path.getsize(path)
      if name.lower().endswith(_LIST_SUFFIXES) and size <= _MAX_HASHED_BYTES:
        with open(path, "rb") as f:
          lists[rel] = hashlib.sha1(f.read()).hexdigest()
      else:
        digest.update(f"{rel}\0{size}\n".encode())
        count, total = count + 1, total + size
  return {"lists": lists,
          "files": {"count": count, "bytes": total, "sha1": digest.hexdigest()}}


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """How a manual folder changed between two fingerprints, in words ([] if it did not)."""
  changes = []
  old_lists, new_lists = dict(old.get("lists", {})), dict(new.get("lists", {}))
  for rel in sorted(old_lists.keys() | new_lists.keys()):
    if rel not in new_lists:
      changes.append(f"{rel} removed")
    elif rel not in old_lists:
      changes.append(f"{rel} added")
    elif old_lists[rel] != new_lists[rel]:
      changes.append(f"{rel} changed")
  a, b = old.get("files", {}), new.get("files", {})
  if a.get("count") != b.get("count"):
    changes.append(f"{b.get('count')} files besides the lists, {a.get('count')} at the "
                   "last build")
  elif a.get("sha1") != b.get("sha1"):
    changes.append("files renamed or resized")
  return changes


def check_image(data: bytes) -> None:
  """Decodes `data` fully (at reduced JPEG scale, which still reads every byte)."""
  with Image.open(io.BytesIO(data)) as img:
    # draft() picks libjpeg's DCT scaling: much faster, and a truncated or corrupt
    # stream still fails in load().
    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()


class ReIdBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes re-ID records with labels, cameras and a split index; subclasses list them."""

  # Metadata features of the dataset, e.g. {"color": np.int64}; values in Record.metadata.
  METADATA_FEATURES: Mapping[str, Any] = {}
  # Further per-image features, e.g. {"part_mask": tfds.features.Image(...)}; values in
  # Record.extra. Encoded images among them are stored as given and read undecoded.
  EXTRA_FEATURES: Mapping[str, tfds.features.FeatureConnector] = {}
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""
  TRAIN_SPLIT = "train"

  def __init__(self, *, strict: bool = False, **kwargs):
    """`strict`: fail on the first unreadable image instead of skipping it."""
    self._strict = strict
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        # JPEG bytes are stored as given (no re-encoding); read them undecoded.
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "vehicle_id": tfds.features.Scalar(np.int64),
        "label": tfds.features.Scalar(np.int64),
        "camera_id": tfds.features.Scalar(np.int64),
        "file_name": tfds.features.Text(),
    }
    if self.METADATA_FEATURES:
      features["metadata"] = tfds.features.FeaturesDict(dict(self.METADATA_FEATURES))
    features.update(self.EXTRA_FEATURES)
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        homepage=self.HOMEPAGE or None,
        citation=self.CITATION or None,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        # Record order = listing order, so the split index lines up with the records.
        disable_shuffling=True,
    )

  @abc.abstractmethod
  def _split_records(self, dl_manager) -> dict[str, Iterable[Record]]:
    """Returns the records of each split, in a sorted, reproducible order."""

  def option_changes(self) -> list[str]:
    """How this builder's options differ from those the existing build was made with,
    in words ([]: none, or no options); a change makes the build command rebuild."""
    return []

  def _train_vehicle_ids(self, records: dict[str, Iterable[Record]]) -> list[int]:
    """The training identities; subclasses whose records are lazy override this."""
    return sorted({r.vehicle_id for r in records.get(self.TRAIN_SPLIT, ())})

  def _split_generators(self, dl_manager):
    if self.MANUAL_DOWNLOAD_INSTRUCTIONS:
      self.info.metadata["manual_fingerprint"] = manual_fingerprint(
          os.fspath(dl_manager.manual_dir))
    records = self._split_records(dl_manager)
    train_ids = self._train_vehicle_ids(records)
    label_of = {vid: i for i, vid in enumerate(train_ids)}
    self.info.metadata["num_classes"] = len(label_of)
    self.info.metadata["index"] = {}
    self.info.metadata["skipped"] = {}
    return {
        split: self._generate_examples(
            split=split, records=recs,
            label_of=label_of if split == self.TRAIN_SPLIT else None)
        for split, recs in records.items()
    }

  def _generate_examples(
      self, *, split: str, records: Iterable[Record],
      label_of: Mapping[int, int] | None) -> Iterator[tuple[int, dict[str, Any]]]:
    index = {k: [] for k in INDEX_KEYS}
    skipped = []
    for rec in records:
      image = rec.image if rec.image is not None else self._read_image(rec)
      if image is None:
        skipped.append(rec.file_name)
        continue
      label = label_of[rec.vehicle_id] if label_of is not None else -1
      example = {
          "image": image,
          "vehicle_id": rec.vehicle_id,
          "label": label,
          "camera_id": rec.camera_id,
          "file_name": rec.file_name,
      }
      if self.METADATA_FEATURES:
        example["metadata"] = dict(rec.metadata)
      if set(rec.extra) != set(self.EXTRA_FEATURES):
        raise ValueError(f"{self.name}: record {rec.file_name} has extra features "
                         f"{sorted(rec.extra)}, the builder declares "
                         f"{sorted(self.EXTRA_FEATURES)}.")
      example.update(rec.extra)
      key = len(index["label"])
      for k in INDEX_KEYS:
        index[k].append(int(example[k]))
      yield key, example
    if skipped:
      logging.warning("%s/%s: skipped %d unreadable images, e.g. %s",
                      self.name, split, len(skipped), skipped[:5])
    if label_of is not None:
      lost = set(label_of.values()) - set(index["label"])
      if lost:
        logging.warning("%s/%s: %d training identities lost all their images",
                        self.name, split, len(lost))
    self.skipped.extend(skipped)
    # Written into metadata.json with the dataset, in the same atomic rename.
    self.info.metadata["index"][split] = index
    self.info.metadata["skipped"][split] = skipped

  def _read_image(self, rec: Record) -> bytes | None:
    """Returns the file's bytes if it decodes; else skips it (or raises when strict)."""
    try:
      with open(rec.path, "rb") as f:
        data = f.read()
      check_image(data)
      return data
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises all three
      if self._strict:
        raise CorruptImageError(
            f"Unreadable image {rec.file_name} ({rec.path}): {e}. Replace or delete it, "
            "or build without --strict to skip unreadable images.") from e
      logging.warning("Skipping unreadable image %s: %s", rec.file_name, e)
      return None
