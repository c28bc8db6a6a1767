"""The dataset table, and random-access re-ID records from the built TFDS datasets.

    source = load_split("veri776", "train", data_dir="~/tensorflow_datasets", builder_config="")
    source[0]  # {"image": JPEG bytes, "label": 3, "vehicle_id": 4, "camera_id": 2, ...}
    # synthetic_vehicles records also hold "part_mask": PNG bytes of a label map
    split_index("veri776", "train", ...)  # labels / ids / cameras of the split, no images read
    entry("my_city")  # Entry("my_city", table="folder", builder_config="my_city")

`DATASETS` is everything the package knows about a dataset, in one place: its TFDS
builder, whether it is built from a manual download, which splits its evaluation
protocol reads and which protocol that is. Datasets are built once by
`python -m musp_jax.build_dataset NAME ...` (licensed ones from their manual download
folder); the synthetic one is built on first use by `ensure_built`. No TensorFlow graph
code runs: records are read with `tfds.data_source`.

A config names datasets by entry (`dataset.name`, `eval.dataset`: comma-separated): a
row of the table, or the name of a dataset the user built from their own images
(`build_dataset folder --name NAME`: a named build of the `folder` row, whose protocol
is recorded with the build). `entry` resolves one to its row and build.
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
  # Its evaluation protocol, by name (musp_jax/retrieval/protocols.py, PROTOCOLS);
  # "" for one each build records (metadata "protocol").
  protocol: str
  # Each build is a dataset of its own, named by its builder config (the user's data:
  # `build_dataset folder --name NAME`, then `dataset.name=NAME`).
  named_builds: bool = False


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
    "folder": Dataset(
        "tfds_builders.folder.folder_dataset_builder", True,
        {"query": "query", "gallery": "gallery"}, "", named_builds=True),
}
NAMED_BUILDS = "folder"  # the row of the datasets users build from their own images
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
class Entry:
  """One dataset of a run: its name in the config, its row of DATASETS, its build."""
  name: str  # "veri776", or a user dataset's name
  table: str  # the key of its row in DATASETS
  builder_config: str  # "" for a dataset without builder configs

  def load_split(self, split: str, data_dir: str) -> ReIdSource:
    return load_split(self.table, split, data_dir=data_dir,
                      builder_config=self.builder_config)

  def split_index(self, split: str, data_dir: str) -> dict[str, np.ndarray]:
    return split_index(self.table, split, data_dir=data_dir,
                       builder_config=self.builder_config)

  def ensure_built(self, data_dir: str, manual_dir: str | None = None) -> None:
    ensure_built(self.table, data_dir=data_dir, builder_config=self.builder_config,
                 manual_dir=manual_dir)


def split_names(text: str) -> list[str]:
  """The entries of a comma-separated dataset list ("veri776, vehicle_id")."""
  return [part.strip() for part in (text or "").split(",")] if (text or "").strip() else []


def entry(name: str, builder_config: str | None = None) -> Entry:
  """The dataset a config calls `name`: a row of DATASETS, or else a user's dataset
  (a named build of NAMED_BUILDS). `builder_config`: the build of a row with builder
  configs (None: its default); other rows and user datasets have their own."""
  if name in DATASETS and not DATASETS[name].named_builds:
    cls = builder_class(name)
    if not cls.BUILDER_CONFIGS:
      return Entry(name, name, "")
    return Entry(name, name, cls.DEFAULT_CONFIG_NAME if builder_config is None
                 else builder_config)
  return Entry(name, NAMED_BUILDS, name)


def training_entries(config: Any) -> list[Entry]:
  """The training datasets of a run config (dataset.name, dataset.builder_config), in
  name order: the order of their labels, whatever order the config lists them in."""
  return sorted((entry(n, config.dataset.builder_config)
                 for n in split_names(config.dataset.name)), key=lambda e: e.name)


def check_user_dataset_name(name: str) -> str:
  """`name` if a dataset of the user's own images may have it, else a ValueError."""
  builder_class(NAMED_BUILDS).check_name(name)
  if name in DATASETS:
    raise ValueError(f"Dataset name {name!r} is taken by the dataset table: choose another")
  return name


def user_datasets(data_dir: str) -> list[str]:
  """The names of the datasets built from users' own images in data_dir."""
  root = os.path.join(os.path.expanduser(data_dir), NAMED_BUILDS)
  version = str(builder_class(NAMED_BUILDS).VERSION)
  if not os.path.isdir(root):
    return []
  return sorted(n for n in os.listdir(root)
                if os.path.exists(os.path.join(root, n, version, "dataset_info.json")))


def build_metadata(e: Entry, data_dir: str) -> dict[str, Any]:
  """The metadata a build wrote (metadata.json); DatasetNotBuiltError if not built."""
  return dict(_prepared_builder(e.table, data_dir, e.builder_config).info.metadata)


def largest_test_splits(e: Entry, data_dir: str) -> list[str]:
  """The splits of a dataset's largest built test set, as its protocol reads them
  (VehicleID: test_2400 if built; VeRi-776: query and gallery)."""
  row = spec(e.table)
  built = _prepared_builder(e.table, data_dir, e.builder_config).info.splits
  for n in sorted(test_sizes(e.table).values(), reverse=True) or [None]:
    splits = [split.format(n=n) for split in row.eval_splits.values()]
    if all(split in built for split in splits):
      return splits
  raise ValueError(f"Dataset {e.name} in {data_dir} has no complete test set; its splits "
                   f"are {sorted(built)}.")


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """What evaluation reads: a dataset, the protocol's splits and name, a row name."""
  entry: Entry
  splits: dict[str, str]  # protocol role -> split
  row_name: str  # the rows' prefix in results: "veri776", "vehicle_id_small", ...
  protocol: str  # the dataset's protocol (Dataset.protocol, or its build's)

  @property
  def name(self) -> str:
    return self.entry.name


def eval_sets(config: Any) -> list[EvalSet]:
  """The evaluation datasets of a run config, in the order eval.dataset lists them
  (default: the training datasets, in the order dataset.name lists them), each with its
  test size (eval.test_size) and build (the training build for a training dataset, else
  the builder's default). A user dataset's protocol is read from its build."""
  training = {e.name: e for e in training_entries(config)}
  names = split_names(config.eval.dataset) or split_names(config.dataset.name)
  return [_eval_set(training.get(name) or entry(name), config) for name in names]


def _eval_set(e: Entry, config: Any) -> EvalSet:
  row = spec(e.table)
  protocol = row.protocol
  if not protocol:
    protocol = build_metadata(e, config.dataset.data_dir)["protocol"]
  sizes = test_sizes(e.table)
  if not sizes:
    return EvalSet(e, dict(row.eval_splits), e.name, protocol)
  size = config.eval.test_size
  if size not in sizes:
    raise ValueError(f"eval.test_size={size!r}; {e.name} has test sizes {list(sizes)}.")
  splits = {role: split.format(n=sizes[size]) for role, split in row.eval_splits.items()}
  return EvalSet(e, splits, f"{e.name}_{size}", protocol)


def config_names(name: str) -> tuple[str, ...]:
  """The builder configs of a dataset; () for one without configs (veri776)."""
  return tuple(c.name for c in builder_class(name).BUILDER_CONFIGS or ())


def _check_config(name: str, builder_config: str | None) -> None:
  if spec(name).named_builds:
    check_user_dataset_name(builder_config)
    return
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
  cls = builder_class(name)
  if spec(name).named_builds:
    cls = cls.named(builder_config)
  return cls(data_dir=os.path.expanduser(data_dir), config=builder_config or None,
             file_format="array_record", **kwargs)


def build_command(name: str, *, data_dir: str, builder_config: str | None,
                  manual_dir: str | None = None) -> str:
  """The shell command that builds this dataset."""
  cmd = f"python -m musp_jax.build_dataset {name}"
  if spec(name).manual_download:
    cmd += f" --manual_dir {manual_dir or 'DIR'}"
  if spec(name).named_builds:
    cmd += f" --name {builder_config}"
  cmd += f" --data_dir {data_dir}"
  if builder_config and not spec(name).named_builds:
    cmd += f" --config {builder_config}"
  return cmd


def display_name(name: str, builder_config: str | None) -> str:
  """How messages name a build: "veri776", "synthetic_vehicles/tiny", a user's "my_city"."""
  if spec(name).named_builds:
    return str(builder_config)
  return f"{name}/{builder_config}" if builder_config else name


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
  if spec(name).named_builds:
    hint = " (DIR: the folder of your images)" if not manual_dir else ""
    built = user_datasets(data_dir)
    hint += (f"; built there: {', '.join(built)}" if built else
             "; no dataset of your own images is built there")
  return DatasetNotBuiltError(
      f"Dataset {display_name(name, builder_config)} is not built in "
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
  # What the builder found in the data (e.g. queries the protocol cannot count).
  findings: list[str] = dataclasses.field(default_factory=list)


def build(name: str, *, data_dir: str, builder_config: str | None,
          manual_dir: str | None = None, strict: bool = False,
          rebuild: bool = False, options: Mapping[str, Any] | None = None) -> BuildReport:
  """Builds a dataset into data_dir. Nothing partial is left behind: TFDS writes into a
  temporary folder and renames it only when every split is done.

  An existing build is kept unless its manual folder changed since (the lists' contents,
  the files' sizes, see reid_base.manual_fingerprint), the builder's `options` differ
  from those it was built with (e.g. the folder builder's keep_junk), or `rebuild` is
  set; then the new build replaces it once complete, and a failed one leaves the old
  build in place.
  """
  options = dict(options or {})
  if spec(name).manual_download:
    instructions = builder_class(name).MANUAL_DOWNLOAD_INSTRUCTIONS
    if not manual_dir:
      raise reid_base.ManualDataError(
          f"Building {name} needs --manual_dir: the folder of its manual download.\n\n"
          f"Manual download instructions:\n{instructions}")
    manual_dir = os.path.expanduser(manual_dir)
    if not os.path.isdir(manual_dir):
      what = ("the folder of your images" if spec(name).named_builds
              else f"the {name} manual download folder")
      raise reid_base.ManualDataError(
          f"Missing {manual_dir}: expected {what}.\n\n"
          f"Manual download instructions:\n{instructions}")
  b = get_builder(name, data_dir=data_dir, builder_config=builder_config, strict=strict,
                  **options)
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
    if not rebuild:
      changes += b.option_changes()
  if changes:
    b = _rebuild(name, b, data_dir=data_dir, builder_config=builder_config,
                 manual_dir=manual_dir, strict=strict, options=options)
  else:
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None),
        file_format="array_record")
  return BuildReport(
      path=os.fspath(b.data_path),
      num_examples={s: b.info.splits[s].num_examples for s in b.info.splits},
      skipped=list(b.skipped), rebuilt_because=changes, note=note,
      findings=list(b.info.metadata.get("notes", []) or []))


def _rebuild(name: str, old: reid_base.ReIdBuilder, *, data_dir: str,
             builder_config: str | None, manual_dir: str | None,
             strict: bool, options: Mapping[str, Any]) -> reid_base.ReIdBuilder:
  """Builds again; the old build is moved aside and restored if the new one fails."""
  path = os.fspath(old.data_path)
  aside = f"{path}.old-{os.getpid()}"
  os.rename(path, aside)
  try:
    b = get_builder(name, data_dir=data_dir, builder_config=builder_config, strict=strict,
                    **options)
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
