"""Saved features: one split's retrieval features in memory (`Features`) and on disk.

The .npz file (`save_features`, written by the evaluator's tools and `embed`) holds

  feats            (N, P, C) float32, each branch L2-normalised
  areas            (N, P) float32, the weights of the CAM distance
  vehicle_id       (N,) int, camera_id (N,) int (-1 where unknown)
  file_name        (N,) str ("" where unknown)
  model_signature  str (core/features.py: which feature sets may be compared)

and any extra arrays a tool adds (embed's model_source). `load_features` also reads a
plain layout, for features of any model: feats (N, D) or (N, P, C), pids (N,), camids
(N,), optionally areas (N, P). A bad file fails with the file and the key named.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from musp_jax.runtime import writing

NPZ_KEYS = ("feats", "areas", "vehicle_id", "camera_id", "file_name",
            "model_signature")
PLAIN_KEYS = ("feats", "pids", "camids")  # features of any model (load_features)


@dataclasses.dataclass(frozen=True)
class Features:
  """One split's retrieval features (the saved .npz format, in memory)."""
  feats: np.ndarray  # (N, P, C) float32, L2-normalised per branch
  areas: np.ndarray  # (N, P) float32
  ids: np.ndarray  # (N,) vehicle ids
  cams: np.ndarray  # (N,) camera ids, -1 where the dataset has none
  file_names: np.ndarray | None = None  # (N,) str
  model_signature: str = ""

  def __post_init__(self):
    n = self.feats.shape[0]
    if self.feats.ndim != 3:
      raise ValueError(f"Features.feats must be (N, P, C), got {self.feats.shape}")
    expected = {"areas": (n, self.feats.shape[1]), "ids": (n,), "cams": (n,)}
    if self.file_names is not None:
      expected["file_names"] = (n,)
    for name, shape in expected.items():
      if getattr(self, name).shape != shape:
        raise ValueError(f"Features.{name} has shape {getattr(self, name).shape}, "
                         f"expected {shape} (feats is {self.feats.shape})")

  def __len__(self) -> int:
    return self.feats.shape[0]

  def take(self, index: np.ndarray) -> "Features":
    """The subset at `index` (indices or a boolean mask)."""
    return Features(
        self.feats[index], self.areas[index], self.ids[index], self.cams[index],
        None if self.file_names is None else self.file_names[index],
        self.model_signature)


def save_features(path: str | os.PathLike, features: Features,
                  **extra: np.ndarray) -> None:
  """Writes the saved-features .npz (feats, areas, vehicle_id, camera_id, file_name,
  model_signature, and any `extra` arrays) atomically: a killed write leaves no file."""
  names = features.file_names
  if names is None:
    names = np.array([""] * len(features))
  with writing.atomic_file(path) as tmp:
    np.savez(tmp, feats=features.feats.astype(np.float32),
             areas=features.areas.astype(np.float32),
             vehicle_id=features.ids, camera_id=features.cams,
             file_name=np.asarray(names, dtype=str),
             model_signature=np.array(features.model_signature), **extra)


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile):
    # numpy's own message talks about pickles, which says nothing useful here.
    raise ValueError(f"{path}: not a readable .npz archive of arrays (written by "
                     "numpy.savez)") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{path}: holds a single .npy array; expected an .npz archive "
                     "(numpy.savez) with named arrays")
  return data


def _read_key(data, path: str, key: str, kinds: str, what: str,
              shape: tuple[int | None, ...] | None = None) -> np.ndarray:
  """data[key], checked: dtype kind in `kinds`, shape (None: any size)."""
  try:
    x = data[key]
  except ValueError:  # an object array: numpy needs pickle to read it
    raise ValueError(f"{path}: key {key!r} holds Python objects; expected "
                     f"{what}") from None
  if x.dtype.kind not in kinds:
    raise ValueError(f"{path}: key {key!r} has dtype {x.dtype}; expected {what}")
  if shape is not None and (x.ndim != len(shape) or any(
      n is not None and n != m for n, m in zip(shape, x.shape))):
    want = "(" + ", ".join("?" if n is None else str(n) for n in shape) + (
        ",)" if len(shape) == 1 else ")")
    raise ValueError(f"{path}: key {key!r} has shape {x.shape}; expected {want}")
  if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
    row = int(np.argwhere(~np.isfinite(x))[0][0])
    raise ValueError(f"{path}: key {key!r} has NaN or infinite values (row {row})")
  return x


def load_features(path: str | os.PathLike) -> Features:
  """Reads saved features, in either of two .npz layouts.

  - `save_features`' (embed, the evaluator): feats (N, P, C), areas (N, P),
    vehicle_id (N,), camera_id (N,), optionally file_name (N,) and
    model_signature.
  - plain, for features of any model: feats (N, D) or (N, P, C) float, pids
    (N,) int, camids (N,) int, optionally areas (N, P) (default: equal
    weights; (N, D) features are one branch, P = 1).
  Errors name the file and the key.
  """
  path = os.fspath(path)
  with _open_npz(path) as data:
    keys = set(data.files)
    ours = bool(keys & {"vehicle_id", "camera_id"})
    needed = (("feats", "areas", "vehicle_id", "camera_id") if ours
              else ("feats", "pids", "camids"))
    missing = [k for k in needed if k not in keys]
    if missing:
      raise ValueError(
          f"{path}: missing keys {missing} (found {sorted(keys)}); a features file "
          f"holds {list(NPZ_KEYS[:4])} (saved_features.save_features) or the plain "
          f"{list(PLAIN_KEYS)} (+ optional areas)")
    feats = _read_key(data, path, "feats", "f", "float features (N, D) or (N, P, C)")
    if feats.ndim not in (2, 3) or feats.shape[0] == 0 or feats.shape[-1] == 0:
      raise ValueError(f"{path}: key 'feats' has shape {feats.shape}; expected "
                       "(N, D) or (N, P, C) with N, D, C > 0")
    n = feats.shape[0]
    if feats.ndim == 2:
      feats = feats[:, None, :]
    ids_key, cams_key = ("vehicle_id", "camera_id") if ours else ("pids", "camids")
    ids = _read_key(data, path, ids_key, "iu", "integer ids", (n,))
    cams = _read_key(data, path, cams_key, "iu", "integer camera ids (-1: none)", (n,))
    if "areas" in keys:
      areas = _read_key(data, path, "areas", "f", "float areas (N, P)",
                        (n, feats.shape[1]))
      bad = np.flatnonzero((areas < 0).any(-1) | (areas.sum(-1) <= 0))
      if bad.size:
        raise ValueError(f"{path}: key 'areas' row {int(bad[0])} is {areas[bad[0]]}; "
                         "expected non-negative weights with a positive sum")
    else:
      areas = np.ones(feats.shape[:2], np.float32)
    names = signature = None
    if "file_name" in keys:
      names = _read_key(data, path, "file_name", "US", "strings (N,)", (n,))
    if "model_signature" in keys:
      signature = str(_read_key(data, path, "model_signature", "US",
                                "a string", ()))
  return Features(feats.astype(np.float32), areas.astype(np.float32), ids, cams,
                  names, signature or "")


def as_features(x: Features | str | os.PathLike, what: str) -> Features:
  """`x` itself, or the saved features at path `x`; `what` names it in the error."""
  if isinstance(x, Features):
    return x
  if isinstance(x, (str, os.PathLike)):
    return load_features(x)
  raise TypeError(f"{what} must be Features or a .npz path, "
                  f"got {type(x).__name__}")
