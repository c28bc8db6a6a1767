"""Multi-process (multi-host) start-up, and a launcher for N processes on one machine.

On a cluster (SLURM, Open MPI, Cloud TPU) `jax.distributed.initialize()` finds
everything itself. Elsewhere, every process needs the coordinator's address,
the number of processes and its own id; runtime.process.initialize_distributed
(which `--config.distributed=True` calls) reads them from

    JAX_COORDINATOR_ADDRESS=host:port  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i

(the first is also read by JAX itself). One machine, N processes:

    python -m musp_jax.distributed --num_processes 2 -- \\
        python -m musp_jax.main --config configs/synthetic.py:runlocal \\
        --workdir workdirs/mh --config.distributed=True

On CPU, cross-process collectives use gloo (jax's default CPU collectives,
`jax_cpu_collectives_implementation`); each process feeds its own slice of the
global batch (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from musp_jax.runtime import cli
from musp_jax.runtime import process

def free_port() -> int:
  """A TCP port that is free on localhost now (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_local(command: Sequence[str], num_processes: int, *, port: int | None = None,
                 env: dict[str, str] | None = None, timeout: float | None = None,
                 capture: bool = False) -> list[subprocess.CompletedProcess]:
  """Runs `command` as processes 0..N-1 of one job on this machine; waits for all.

  Raises CalledProcessError naming the first process that failed.
  """
  port = port or free_port()
  procs, outputs = [], []
  for i in range(num_processes):
    proc_env = {**os.environ, **(env or {}), process.ENV_ADDRESS: f"127.0.0.1:{port}",
                process.ENV_NUM_PROCESSES: str(num_processes),
                process.ENV_PROCESS_ID: str(i)}
    # Files, not pipes: a process blocked on a full pipe would stall the others.
    out = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) if capture else (None,
                                                                                        None)
    outputs.append(out)
    procs.append(subprocess.Popen(list(command), env=proc_env, text=True, stdout=out[0],
                                  stderr=out[1]))
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    # Wait for all; one failed process leaves the others waiting forever: stop them.
    while any(p.poll() is None for p in procs):
      if any(p.returncode for p in procs if p.poll() is not None):
        break
      if deadline is not None and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(list(command), timeout)
      time.sleep(0.1)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results = []
  for proc, files in zip(procs, outputs):
    texts = []
    for f in files:
      if f is not None:
        f.seek(0)
        texts.append(f.read())
        f.close()
      else:
        texts.append(None)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, *texts))
  for i, r in enumerate(results):
    if r.returncode:
      raise subprocess.CalledProcessError(
          r.returncode, f"process {i}/{num_processes}: {' '.join(command)}", r.stdout,
          r.stderr)
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m musp_jax.distributed",
      description="Run a command as N JAX processes on this machine.",
      usage="python -m musp_jax.distributed --num_processes N -- COMMAND ...")
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, default=None)
  cli.add_verbose_arg(parser)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  return cli.run(lambda: _launch(command, args.num_processes, args.port),
                 verbose=args.verbose)


def _launch(command: Sequence[str], num_processes: int, port: int | None) -> None:
  try:
    launch_local(command, num_processes, port=port)
  except subprocess.CalledProcessError as e:
    raise ChildProcessError(f"{e.cmd} exited with status {e.returncode}") from e


if __name__ == "__main__":
  sys.exit(main())
