"""veri_wild: VERI-Wild (174 cameras; train 30,671 ids; test sizes 3000/5000/10000 ids).

    python -m musp_jax.build_dataset veri_wild --manual_dir DIR

One build holds the training images once and every test set the download has, as splits
`query_<N>` / `gallery_<N>` (N = 3000, 5000, 10000); evaluation picks one with
`eval.test_size`.

Two list formats are in circulation and both are read: lines "<vid>/<imgid>" (train_list.txt,
test_N.txt, test_N_query.txt) and lines "<relpath> <label> <camid>" (train_list_start0.txt,
test_N_id.txt, test_N_id_query.txt). The vehicle id always comes from the image's folder.
vehicle_info.txt ("vid/imgid;camid;time;model;type;color") may start with a header line.
"""

from __future__ import annotations

import os
import re

import tensorflow_datasets as tfds

from tfds_builders import reid_base

_KEY = re.compile(r"^\d+/\w+$")  # "<vid>/<imgid>"


class Builder(reid_base.ReIdBuilder):
  """VERI-Wild with model/type/colour metadata from vehicle_info.txt."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": "One build with every test set as splits query_<N> / gallery_<N>; no "
               "builder configs.",
  }
  TEST_SIZES = {"small": 3000, "medium": 5000, "large": 10000}
  METADATA_FEATURES = {"model": tfds.features.Text(), "type": tfds.features.Text(),
                       "color": tfds.features.Text()}
  DESCRIPTION = "VERI-Wild vehicle re-identification; metadata is '' where unknown."
  HOMEPAGE = "https://github.com/PKU-IMRE/VERI-Wild"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request VERI-Wild from its authors (https://github.com/PKU-IMRE/VERI-Wild), extract it, and
pass the extracted folder as --manual_dir. It must hold:
  images/<vid>/<imgid>.jpg
  train_test_split/ with either
    train_list.txt, test_N.txt (gallery), test_N_query.txt   lines "<vid>/<imgid>"
  or
    train_list_start0.txt, test_N_id.txt, test_N_id_query.txt   lines "<relpath> <label> <camid>"
  (N = 3000, 5000, 10000) and vehicle_info.txt, lines "<vid>/<imgid>;<camid>;<time>;<model>;
  <type>;<color>", with or without the header line "id/image;Camera ID;Time;Model;Type;Color"
  (needed for camera ids unless the lists carry them).
"""

  def _split_records(self, dl_manager) -> dict[str, list[reid_base.Record]]:
    root = os.fspath(dl_manager.manual_dir)
    inst = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    reid_base.require(os.path.join(root, "images"),
                      "the image folder (images/<vid>/<imgid>.jpg)", inst)
    split_dir = reid_base.require(os.path.join(root, "train_test_split"),
                                  "the list folder train_test_split/", inst)
    info_path = os.path.join(split_dir, "vehicle_info.txt")
    info = read_vehicle_info(info_path) if os.path.exists(info_path) else None
    candidates = {"train": ("train_list.txt", "train_list_start0.txt")}
    for n in self.TEST_SIZES.values():
      candidates[f"query_{n}"] = (f"test_{n}_query.txt", f"test_{n}_id_query.txt")
      candidates[f"gallery_{n}"] = (f"test_{n}.txt", f"test_{n}_id.txt")
    found = {}
    for split, names in candidates.items():
      paths = [os.path.join(split_dir, name) for name in names]
      present = [p for p in paths if os.path.exists(p)]
      if present:
        found[split] = present[0]
      elif split == "train":
        raise reid_base.ManualDataError(
            f"Missing {paths[0]} (or {paths[1]}): expected the {split} list.\n\n"
            f"Manual download instructions:\n{inst}")
    sizes = [n for n in self.TEST_SIZES.values()
             if f"query_{n}" in found or f"gallery_{n}" in found]
    for n in sizes:  # a test set needs both of its lists
      for split in (f"query_{n}", f"gallery_{n}"):
        if split not in found:
          names = candidates[split]
          raise reid_base.ManualDataError(
              f"Missing {os.path.join(split_dir, names[0])} (or {names[1]}): expected the "
              f"{split.split('_')[0]} list of the {n}-id test set.\n\n"
              f"Manual download instructions:\n{inst}")
    if not sizes:
      raise reid_base.ManualDataError(
          f"No test set in {split_dir}: expected test_N_query.txt and test_N.txt (or "
          f"test_N_id_query.txt and test_N_id.txt) for N in "
          f"{list(self.TEST_SIZES.values())}.\n\nManual download instructions:\n{inst}")
    out = {split: [self._record(root, info, entry) for entry in read_split_list(path)]
           for split, path in found.items()}
    if info is None and any(r.camera_id < 0 for recs in out.values() for r in recs):
      raise reid_base.ManualDataError(
          f"Missing {info_path}: expected the camera of each image (the lists give none)."
          f"\n\nManual download instructions:\n{inst}")
    return out

  def _record(self, root, info, entry) -> reid_base.Record:
    folder, stem, list_cam = entry
    cam, model, vtype, color = (info or {}).get(f"{folder}/{stem}", (list_cam, "", "", ""))
    return reid_base.Record(
        path=os.path.join(root, "images", folder, stem + ".jpg"),
        file_name=f"images/{folder}/{stem}.jpg", vehicle_id=int(folder), camera_id=cam,
        metadata={"model": model, "type": vtype, "color": color})


def read_split_list(path: str) -> list[tuple[str, str, int]]:
  """(vid folder, image stem, camera or -1) per line, for either list format."""
  out = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, 1):
      tokens = line.split()
      if not tokens:
        continue
      if len(tokens) == 1:  # "<vid>/<imgid>"
        rel, cam = tokens[0], -1
      elif len(tokens) == 3 and tokens[2].lstrip("-").isdigit():  # "<relpath> <label> <camid>"
        rel, cam = tokens[0], int(tokens[2])
      else:
        raise reid_base.ManualDataError(
            f"{path}:{line_no}: expected \"<vid>/<imgid>\" or \"<relpath> <label> <camid>\", "
            f"got {line.strip()!r}")
      parts = rel.replace("\\", "/").split("/")
      if len(parts) < 2 or not parts[-2].isdigit():
        raise reid_base.ManualDataError(
            f"{path}:{line_no}: {rel!r} has no numeric vehicle folder (<vid>/<imgid>)")
      stem = parts[-1][:-4] if parts[-1].lower().endswith(".jpg") else parts[-1]
      out.append((parts[-2], stem, cam))
  if not out:
    raise reid_base.ManualDataError(
        f"{path} is empty: expected lines \"<vid>/<imgid>\" or \"<relpath> <label> <camid>\".")
  return out


def read_vehicle_info(path: str) -> dict[str, tuple[int, str, str, str]]:
  """"<vid>/<imgid>" -> (camera, model, type, colour); a header line is detected and skipped."""
  out = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, 1):
      fields = [x.strip() for x in line.strip().split(";")]
      if not fields[0]:
        continue
      if not _KEY.match(fields[0]):
        if line_no == 1:  # the header "id/image;Camera ID;Time;Model;Type;Color"
          continue
        raise reid_base.ManualDataError(
            f"{path}:{line_no}: expected \"<vid>/<imgid>;<camid>;<time>;<model>;<type>;"
            f"<color>\", got {line.strip()!r}")
      if len(fields) < 6 or not fields[1].isdigit():
        raise reid_base.ManualDataError(
            f"{path}:{line_no}: expected 6 ';'-separated fields with a numeric camera, "
            f"got {line.strip()!r}")
      out[fields[0]] = (int(fields[1]), fields[3], fields[4], fields[5])
  return out
