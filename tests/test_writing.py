"""Safe outputs: the workdir lock (held by another process, taken over from a dead one),
atomic files and folders that never lose what was there."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from musp_jax.runtime import writing

ROOT = pathlib.Path(__file__).resolve().parents[1]

_HOLDER = """
import sys, time
from musp_jax.runtime import writing
lock = writing.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_second_holder_is_refused_naming_host_and_pid(tmp_path, caplog):
  holder = _hold_lock(tmp_path)
  try:
    with pytest.raises(writing.WorkdirLockedError) as e:
      writing.WorkdirLock(tmp_path).acquire()
    assert (f"{tmp_path} is in use by another training run (host {socket.gethostname()}, "
            f"pid {holder.pid}, since ") in str(e.value)
    assert "use another --workdir" in str(e.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
  # The kernel dropped the lock with its process; the record still names it.
  assert writing.read_holder(str(tmp_path / ".lock"))["pid"] == holder.pid
  with caplog.at_level("WARNING"):
    lock = writing.WorkdirLock(tmp_path).acquire()
  assert f"Took over the lock of host {socket.gethostname()}, pid {holder.pid}" in caplog.text
  assert writing.read_holder(lock.path)["pid"] == os.getpid()
  lock.release()
  # Released cleanly: an empty record, and the next holder takes it without a warning.
  assert (tmp_path / ".lock").read_text() == ""
  caplog.clear()
  with caplog.at_level("WARNING"), writing.WorkdirLock(tmp_path):
    pass
  assert "Took over" not in caplog.text


def test_atomic_file_keeps_the_old_content_when_writing_fails(tmp_path):
  path = tmp_path / "out.json"
  writing.write_text(path, "old")
  with pytest.raises(RuntimeError, match="disk full"):
    with writing.atomic_file(path) as tmp:
      pathlib.Path(tmp).write_text("half")
      raise RuntimeError("disk full")
  assert path.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
  (tmp_path / "folder.npz").mkdir()
  with pytest.raises(writing.OutputRefusedError, match="folder.npz is a folder"):
    writing.write_text(tmp_path / "folder.npz", "x")


def test_replace_folder_only_replaces_its_own_output(tmp_path):
  owned = lambda p: (pathlib.Path(p) / "MINE").exists()

  def write(text):
    def fn(tmp):
      os.makedirs(tmp)
      pathlib.Path(tmp, "MINE").write_text(text)
    return fn

  out = tmp_path / "out"
  writing.replace_folder(out, write("v1"), owned=owned, what="mine", overwrite=False)
  with pytest.raises(writing.OutputRefusedError, match="exists; pass --overwrite"):
    writing.replace_folder(out, write("v2"), owned=owned, what="mine", overwrite=False)
  with pytest.raises(ValueError, match="bad source"):  # a failed write loses nothing
    writing.replace_folder(out, lambda tmp: (_ for _ in ()).throw(ValueError("bad source")),
                           owned=owned, what="mine", overwrite=True)
  assert (out / "MINE").read_text() == "v1"
  writing.replace_folder(out, write("v2"), owned=owned, what="mine", overwrite=True)
  assert (out / "MINE").read_text() == "v2"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
  workdir = tmp_path / "workdir"
  (workdir / "checkpoints").mkdir(parents=True)
  with pytest.raises(writing.OutputRefusedError,
                     match=r"workdir exists and is not mine; refusing to replace it, even "
                     "with --overwrite"):
    writing.replace_folder(workdir, write("v3"), owned=owned, what="mine", overwrite=True)
  assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]


def test_check_writable_says_why(tmp_path):
  assert writing.check_writable(tmp_path) is None
  assert writing.check_writable(tmp_path / "missing") == "No such file or directory"
  assert not any(tmp_path.iterdir())  # the probe is gone
