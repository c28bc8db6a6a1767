"""Entry-point plumbing: stop requests (real signals, in a subprocess), error lines."""

import pathlib
import signal
import subprocess
import sys
import time

import pytest

from musp_jax.runtime import process

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A loop like training's: it stops at its next check after a first signal, then takes
# long to finish (a slow save), during which the second signal arrives.
_LOOP = """
import time
from musp_jax.runtime import process
with process.StopRequests() as stop:
  print("ready", flush=True)
  while stop.signum is None:
    time.sleep(0.01)
  print("stopping", flush=True)
  time.sleep(60)
print("finished", flush=True)
"""


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_to_stop_and_a_second_one_ends_the_process(first):
  proc = subprocess.Popen([sys.executable, "-c", _LOOP], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.readline().strip() == "ready"
  proc.send_signal(first)
  assert proc.stdout.readline().strip() == "stopping"
  sent = time.monotonic()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=30)
  assert time.monotonic() - sent < 10  # at once, not after the 60 s "save"
  assert proc.returncode == -signal.SIGINT  # ended by the signal itself
  assert "finished" not in out
  assert (f"{signal.Signals(first).name} received: finishing the current step and "
          "saving it (Ctrl-C again to stop at once, without saving).") in err
  assert "Traceback" not in err


def test_handlers_are_restored_after_the_loop():
  before = {s: signal.getsignal(s) for s in process.StopRequests.SIGNALS}
  with process.StopRequests() as stop:
    assert all(signal.getsignal(s) == stop._handle for s in process.StopRequests.SIGNALS)
  assert {s: signal.getsignal(s) for s in process.StopRequests.SIGNALS} == before


def test_tools_with_their_own_argument_parser_can_start_grain_workers():
  """grain reads absl flags when it starts workers; `python -m musp_jax.visualize demo`
  (argparse, not an absl app) failed with UnparsedFlagAccessError."""
  code = ("from absl import flags\n"
          "from musp_jax.runtime import process\n"
          "flags.DEFINE_bool('read_in_a_worker', False, '')  # as grain defines its own\n"
          "assert not flags.FLAGS.is_parsed()\n"
          "process.setup()\n"
          "print(flags.FLAGS.read_in_a_worker)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "False"
