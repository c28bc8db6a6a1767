"""The dataset table, and random-access re-ID records from the built TFDS datasets.

    source = load_split("veri776", "train", data_dir="~/tensorflow_datasets", builder_config="")
    source[0]  # {"image": JPEG bytes, "label": 3, "vehicle_id": 4, "camera_id": 2, ...}
    # synthetic_vehicles records also hold "part_mask": PNG bytes of a label map
    split_index("veri776", "train", ...)  # labels / ids / cameras of the split, no images read

`DATASETS` is everything the package knows about a dataset, in one place: its TFDS
builder, whether it is built from a manual download, which splits its evaluation
protocol reads and which protocol that is. Datasets are built once by
`python -m musp_jax.build_dataset NAME ...` (licensed ones from their manual download
folder); the synthetic one is built on first use by `ensure_built`. No TensorFlow graph
code runs: records are read with `tfds.data_source`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import reid_base


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One row of the dataset table."""
  builder: str  # module of the TFDS builder (its class `Builder`)
  manual_download: bool  # built from a licensed download (--manual_dir)
  # Protocol role -> split name; "{n}" is the test size's number (builder.TEST_SIZES).
  eval_splits: Mapping[str, str]
  # Its evaluation protocol, by name (musp_jax/retrieval/protocols.py, PROTOCOLS).
  protocol: str


DATASETS: dict[str, Dataset] = {
    "veri776": Dataset(
        "tfds_builders.veri776.veri776_dataset_builder", True,
        {"query": "query", "gallery": "gallery"}, "query_gallery"),
    "vehicle_id": Dataset(
        "tfds_builders.vehicle_id.vehicle_id_dataset_builder", True,
        {"test": "test_{n}"}, "vehicle_id"),
    "veri_wild": Dataset(
        "tfds_builders.veri_wild.veri_wild_dataset_builder", True,
        {"query": "query_{n}", "gallery": "gallery_{n}"}, "veri_wild"),
    "synthetic_vehicles": Dataset(
        "tfds_builders.synthetic_vehicles.synthetic_vehicles_dataset_builder", False,
        {"query": "query", "gallery": "gallery"}, "query_gallery"),
}
INDEX_KEYS = reid_base.INDEX_KEYS
# Encoded image features, read as their bytes (never decoded by TFDS).
ENCODED_FEATURES = ("image", "part_mask")


class DatasetNotBuiltError(FileNotFoundError):
  """The dataset has not been built into data_dir; the message holds the command."""


def spec(name: str) -> Dataset:
  """The table row of `name`, or a ValueError listing the known datasets."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
  return DATASETS[name]


def builder_class(name: str) -> type[reid_base.ReIdBuilder]:
  return importlib.import_module(spec(name).builder).Builder


def test_sizes(name: str) -> dict[str, int]:
  """Test-size words -> numbers of ids, for datasets with several test sets."""
  return dict(getattr(builder_class(name), "TEST_SIZES", {}))


def part_classes(name: str) -> tuple[str, ...]:
  """The names of the values of a dataset's ground-truth part masks (0: background);
  () for a dataset without part masks."""
  return tuple(getattr(builder_class(name), "PART_CLASSES", ()))


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """What evaluation reads: a dataset, its build, the protocol's splits and name, a row
  name."""
  name: str
  builder_config: str
  splits: dict[str, str]  # protocol role -> split
  row_name: str
  protocol: str  # the dataset's protocol (Dataset.protocol)


def eval_set(config: Any) -> EvalSet:
  """The evaluation dataset of a run config: eval.dataset (default: the training
  dataset), its test size (eval.test_size) and build (the training build when it is
  the training dataset, else the builder's default)."""
  name = config.eval.dataset or config.dataset.name
  row = spec(name)
  if name == config.dataset.name:
    builder_config = config.dataset.builder_config
  else:
    cls = builder_class(name)
    builder_config = cls.DEFAULT_CONFIG_NAME if cls.BUILDER_CONFIGS else ""
  sizes = test_sizes(name)
  if not sizes:
    return EvalSet(name, builder_config, dict(row.eval_splits), name, row.protocol)
  size = config.eval.test_size
  if size not in sizes:
    raise ValueError(f"eval.test_size={size!r}; {name} has test sizes {list(sizes)}.")
  splits = {role: split.format(n=sizes[size]) for role, split in row.eval_splits.items()}
  return EvalSet(name, builder_config, splits, f"{name}_{size}", row.protocol)


def config_names(name: str) -> tuple[str, ...]:
  """The builder configs of a dataset; () for one without configs (veri776)."""
  return tuple(c.name for c in builder_class(name).BUILDER_CONFIGS or ())


def _check_config(name: str, builder_config: str | None) -> None:
  names = config_names(name)
  if names and builder_config not in names:
    raise ValueError(
        f"Dataset {name!r} needs builder_config in {list(names)}, got {builder_config!r}.")
  if not names and builder_config:
    raise ValueError(
        f"Dataset {name!r} has no builder configs; set builder_config to '' (got "
        f"{builder_config!r}).")


def get_builder(name: str, *, data_dir: str, builder_config: str | None,
                **kwargs) -> reid_base.ReIdBuilder:
  """The dataset's builder in `data_dir` (reads the built dataset's info if present)."""
  _check_config(name, builder_config)
  return builder_class(name)(
      data_dir=os.path.expanduser(data_dir), config=builder_config or None,
      file_format="array_record", **kwargs)


def build_command(name: str, *, data_dir: str, builder_config: str | None,
                  manual_dir: str | None = None) -> str:
  """The shell command that builds this dataset."""
  cmd = f"python -m musp_jax.build_dataset {name}"
  if spec(name).manual_download:
    cmd += f" --manual_dir {manual_dir or 'DIR'}"
  cmd += f" --data_dir {data_dir}"
  if builder_config:
    cmd += f" --config {builder_config}"
  return cmd


def is_built(name: str, *, data_dir: str, builder_config: str | None) -> bool:
  """Whether the dataset is complete in data_dir (TFDS renames it there when done)."""
  _check_config(name, builder_config)
  version = str(builder_class(name).VERSION)
  path = os.path.join(os.path.expanduser(data_dir), name, builder_config or "", version)
  # Checked on disk: constructing a builder for a missing folder logs warnings.
  return os.path.exists(os.path.join(path, "dataset_info.json"))


def _not_built(name: str, data_dir: str, builder_config: str | None,
               manual_dir: str | None = None) -> DatasetNotBuiltError:
  """The error for a dataset missing from data_dir, naming the command that builds it."""
  cmd = build_command(name, data_dir=data_dir, builder_config=builder_config,
                      manual_dir=manual_dir)
  hint = (" (DIR: the folder of the manual download)"
          if spec(name).manual_download and not manual_dir else "")
  return DatasetNotBuiltError(
      f"Dataset {name}{'/' + builder_config if builder_config else ''} is not built in "
      f"{os.path.expanduser(data_dir)}; build it with: {cmd}{hint}")


def _prepared_builder(name: str, data_dir: str, builder_config: str | None):
  if not is_built(name, data_dir=data_dir, builder_config=builder_config):
    raise _not_built(name, data_dir, builder_config)
  return get_builder(name, data_dir=data_dir, builder_config=builder_config)


def _require_split(builder: reid_base.ReIdBuilder, split: str) -> None:
  """Splits are those of the build (VehicleID / VERI-Wild hold the test lists found)."""
  if split not in builder.info.splits:
    raise ValueError(f"Dataset {builder.name} in {builder.data_dir} has splits "
                     f"{sorted(builder.info.splits)}, not {split!r}.")


def _to_python(record: dict[str, Any]) -> dict[str, Any]:
  """TFDS numpy values -> Python values (text as str, encoded images kept as bytes)."""
  out = {}
  for k, v in record.items():
    if k in ENCODED_FEATURES:
      out[k] = bytes(v)
    elif isinstance(v, dict):
      out[k] = _to_python(v)
    elif isinstance(v, bytes):
      out[k] = v.decode("utf-8")
    elif isinstance(v, np.generic):
      out[k] = v.item()
    else:
      out[k] = v
  return out


@dataclasses.dataclass
class ReIdSource(Sequence):
  """One split as a random-access sequence of record dicts (pickles by name, for workers)."""

  name: str
  split: str
  data_dir: str
  builder_config: str | None

  def __post_init__(self):
    self._source = None

  @property
  def tfds_source(self):
    if self._source is None:
      b = _prepared_builder(self.name, self.data_dir, self.builder_config)
      _require_split(b, self.split)
      self._source = b.as_data_source(
          self.split, decoders={k: tfds.decode.SkipDecoding() for k in ENCODED_FEATURES
                                if k in b.info.features})
    return self._source

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    n = len(self.tfds_source)
    i = i.__index__()
    if not -n <= i < n:
      raise IndexError(f"{self.name}/{self.split}: index {i} out of range [0, {n}).")
    return _to_python(self.tfds_source[i % n])

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      yield self[i]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [_to_python(r) for r in self.tfds_source.__getitems__(list(indices))]

  def __getstate__(self):
    # Worker processes reopen the files instead of receiving open readers.
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = None


def load_split(name: str, split: str, *, data_dir: str,
               builder_config: str | None) -> ReIdSource:
  """A split of a built dataset; raises DatasetNotBuiltError with the build command."""
  spec(name)  # rejects unknown names
  source = ReIdSource(name, split, data_dir, builder_config)
  len(source)  # open now, so a missing dataset fails here
  return source


def split_index(name: str, split: str, *, data_dir: str,
                builder_config: str | None) -> dict[str, np.ndarray]:
  """{"label", "vehicle_id", "camera_id"} int64 arrays of a whole split, no images read.

  They come from the index written with the dataset (metadata.json); its length and its
  first and last entries are checked against the records.
  """
  b = _prepared_builder(name, data_dir, builder_config)
  _require_split(b, split)
  try:
    index = b.info.metadata["index"][split]
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"{b.data_dir}/metadata.json has no split index for {split!r}; rebuild the dataset "
        f"({build_command(name, data_dir=data_dir, builder_config=builder_config)}).") from e
  arrays = {k: np.asarray(index[k], np.int64) for k in INDEX_KEYS}
  num = b.info.splits[split].num_examples
  source = load_split(name, split, data_dir=data_dir, builder_config=builder_config)
  for k, v in arrays.items():
    if len(v) != num:
      raise ValueError(f"{b.data_dir}: split index {split}/{k} has {len(v)} entries, the "
                       f"split has {num} records; rebuild the dataset.")
  for i in {0, num - 1} if num else ():
    rec = source[i]
    for k in INDEX_KEYS:
      if rec[k] != arrays[k][i]:
        raise ValueError(f"{b.data_dir}: split index {split}/{k}[{i}] = {arrays[k][i]} "
                         f"but the record holds {rec[k]}; rebuild the dataset.")
  return arrays


def num_classes(name: str, *, data_dir: str, builder_config: str | None) -> int:
  """Number of training identities K (labels are 0..K-1)."""
  b = _prepared_builder(name, data_dir, builder_config)
  return int(b.info.metadata["num_classes"])


@dataclasses.dataclass
class BuildReport:
  path: str
  num_examples: dict[str, int]
  skipped: list[str]
  # Why an existing build was replaced (the manual folder's changes), or [].
  rebuilt_because: list[str] = dataclasses.field(default_factory=list)
  note: str = ""  # e.g. an older build that cannot be checked against its folder


def build(name: str, *, data_dir: str, builder_config: str | None,
          manual_dir: str | None = None, strict: bool = False,
          rebuild: bool = False) -> BuildReport:
  """Builds a dataset into data_dir. Nothing partial is left behind: TFDS writes into a
  temporary folder and renames it only when every split is done.

  An existing build is kept unless its manual folder changed since (the lists' contents,
  the files' sizes, see reid_base.manual_fingerprint) or `rebuild` is set; then the new
  build replaces it once complete, and a failed one leaves the old build in place.
  """
  if spec(name).manual_download:
    instructions = builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS
    if not manual_dir:
      raise reid_base.ManualDataError(
          f"Building {name} needs --manual_dir: the folder of its manual download.\n\n"
          f"Manual download instructions:\n{instructions}")
    manual_dir = os.path.expanduser(manual_dir)
    if not os.path.isdir(manual_dir):
      raise reid_base.ManualDataError(
          f"Missing {manual_dir}: expected the {name} manual download folder.\n\n"
          f"Manual download instructions:\n{instructions}")
  b = get_builder(name, data_dir=data_dir, builder_config=builder_config, strict=strict)
  changes, note = ([], "")
  if is_built(name, data_dir=data_dir, builder_config=builder_config):
    if rebuild:
      changes = ["--rebuild was given"]
    elif spec(name).manual_download:
      stored = b.info.metadata.get("manual_fingerprint")
      if stored is None:
        note = (f"This build of {name} predates the record of its manual folder, so a "
                "change to the folder cannot be seen; pass --rebuild to build it again.")
      else:
        changes = [f"the manual folder {manual_dir} changed since: {change}"
                   for change in reid_base.fingerprint_changes(
                       stored, reid_base.manual_fingerprint(manual_dir))]
  if changes:
    b = _rebuild(name, b, data_dir=data_dir, builder_config=builder_config,
                 manual_dir=manual_dir, strict=strict)
  else:
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None),
        file_format="array_record")
  return BuildReport(
      path=os.fspath(b.data_path),
      num_examples={s: b.info.splits[s].num_examples for s in b.info.splits},
      skipped=list(b.skipped), rebuilt_because=changes, note=note)


def _rebuild(name: str, old: reid_base.ReIdBuilder, *, data_dir: str,
             builder_config: str | None, manual_dir: str | None,
             strict: bool) -> reid_base.ReIdBuilder:
  """Builds again; the old build is moved aside and restored if the new one fails."""
  path = os.fspath(old.data_path)
  aside = f"{path}.old-{os.getpid()}"
  os.rename(path, aside)
  try:
    b = get_builder(name, data_dir=data_dir, builder_config=builder_config, strict=strict)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None),
        file_format="array_record")
  except BaseException:
    if not os.path.exists(path):
      os.rename(aside, path)
    raise
  shutil.rmtree(aside, ignore_errors=True)
  return b


def ensure_built(name: str, *, data_dir: str, builder_config: str | None,
                 manual_dir: str | None = None) -> None:
  """Builds the synthetic dataset on first use; for a licensed dataset, raises
  DatasetNotBuiltError with the build command (naming `manual_dir` if given) if it is not
  built yet: building one takes long, so it is an explicit step."""
  if is_built(name, data_dir=data_dir, builder_config=builder_config):
    return
  if not spec(name).manual_download:
    build(name, data_dir=data_dir, builder_config=builder_config)
    return
  raise _not_built(name, data_dir, builder_config, manual_dir)
