"""Writing outputs safely: the training workdir's lock, atomic files and folders.

    with writing.WorkdirLock(workdir):          # one training run per workdir
      ...
    with writing.atomic_file("gallery.npz") as tmp:   # readers never see half a file
      np.savez(tmp, ...)
    writing.replace_folder(out, write, owned=is_mine)  # a folder swapped in when done

A lock is an advisory `flock` on <workdir>/.lock, which holds the holder's host and pid
for the message a second run prints. The kernel drops the lock when its process dies,
however it dies, so a lock left by a killed run is taken over without a question; the
file's content then names the run that did not release it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator

LOCK_NAME = ".lock"


class WorkdirLockedError(OSError):
  """Another live process trains in this workdir."""


class OutputRefusedError(FileExistsError):
  """An output path holds something this tool did not write."""


class WorkdirLock:
  """An exclusive lock on a training workdir, held while the run lives."""

  def __init__(self, workdir: str | os.PathLike, name: str = LOCK_NAME):
    self.path = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(workdir))), name)
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = _describe(read_holder(self.path))
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another training run ({holder}); "
          "wait for it to end, stop it, or use another --workdir.") from None
    previous = read_holder(self.path)
    if previous:  # its process died without releasing the lock (a kill, a crash)
      logging.warning("Took over the lock of %s in %s: that run ended without "
                      "releasing it.", _describe(previous), os.path.dirname(self.path))
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty lock file means the last run released it
    finally:
      os.close(fd)  # closing drops the flock

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def read_holder(path: str) -> dict:
  """The host/pid record of a lock file ({} when empty or unreadable)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read().strip()
    return json.loads(text) if text else {}
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder:
    return "host and pid not recorded yet"
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"since {holder.get('since', '?')}")


# --------------------------------------------------------------------------
# Files and folders.


def _temporary_sibling(path: str, tag: str) -> str:
  """A hidden name beside `path` that keeps its extension (numpy and matplotlib go by it)."""
  head, tail = os.path.split(path)
  stem, ext = os.path.splitext(tail)
  return os.path.join(head, f".{stem}.{tag}-{os.getpid()}{ext}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path next to `path`; renamed onto `path` when the block ends.

  A failure or a kill leaves `path` as it was. A folder at `path` is refused.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isdir(path):
    raise OutputRefusedError(f"{path} is a folder; expected a file path to write.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _temporary_sibling(path, "tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a text file atomically (see `atomic_file`)."""
  with atomic_file(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


def check_replaceable(path: str | os.PathLike, *, owned: Callable[[str], bool], what: str,
                      overwrite: bool) -> None:
  """Raises OutputRefusedError unless `path` is free, or `owned` and `overwrite` is set.

  `owned(path)` says whether the calling tool wrote that folder: a training workdir, or
  any other folder, is never replaced, even with --overwrite.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.lexists(path):
    return
  if not (os.path.isdir(path) and owned(path)):
    raise OutputRefusedError(
        f"{path} exists and is not {what}; refusing to replace it, even with "
        "--overwrite. Choose another output path.")
  if not overwrite:
    raise OutputRefusedError(f"{path} exists; pass --overwrite to replace it.")


def replace_folder(path: str | os.PathLike, write: Callable[[str], None], *,
                   owned: Callable[[str], bool], what: str, overwrite: bool) -> None:
  """Writes a folder with `write(tmp)` beside `path`, then swaps it in.

  `check_replaceable` decides whether an existing `path` may go; it is removed only
  once the new folder is complete, so a failed or killed write loses nothing.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  check_replaceable(path, owned=owned, what=what, overwrite=overwrite)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp, old = _temporary_sibling(path, "tmp"), _temporary_sibling(path, "old")
  for leftover in (tmp, old):
    shutil.rmtree(leftover, ignore_errors=True)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(path):
    os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> str | None:
  """None if files can be created in `folder`, else the reason (e.g. read-only)."""
  folder = os.path.abspath(os.path.expanduser(os.fspath(folder)))
  probe = _temporary_sibling(os.path.join(folder, "write-check"), "probe")
  try:
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
    return None
  except OSError as e:
    return e.strerror or str(e)
