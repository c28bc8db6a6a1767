"""How every command-line tool ends: its output, or one line `error: ...` and an exit code.

    def main(argv=None) -> int:
      args = parser.parse_args(argv)            # bad arguments: argparse exits with 2
      return cli.run(lambda: work(args), verbose=args.verbose)

Every tool (main, demo, build_dataset, import_weights, embed, search, evaluate, export,
visualize, distributed) ends through `run`, with these exit codes (README, "Exit
codes"):

  0      done
  1      an error the message names and a user can act on (`ERRORS`): a bad value,
         key or file, a missing dataset, package or checkpoint, a busy workdir
  2      a usage error: bad or missing command-line arguments (argparse's code;
         `usage_error` for the absl tools)
  3      training stopped on a non-finite loss (the message names the last good
         checkpoint)
  128+N  stopped by signal N, the work saved (130: Ctrl-C, 143: SIGTERM)

The message is printed as `error: <message>` on stderr; `--verbose` prints the
traceback before it. Any other exception is a bug: Python prints its traceback and
exits with 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3

# Errors a user can act on: a bad value or key, a missing, unreadable or foreign file,
# a missing package, a busy workdir, a diverged run (FloatingPointError).
ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


class Stopped(Exception):
  """A run that stopped as it was asked to (a signal), its work saved."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def print_error(error: BaseException | str, *, verbose: bool = False) -> None:
  """Prints `error: <message>` to stderr, after the traceback when `verbose`."""
  if verbose and isinstance(error, BaseException):
    traceback.print_exception(error)
  print(f"error: {error}", file=sys.stderr, flush=True)


def run(work: Callable[[], Any], *, verbose: bool = False) -> int:
  """Runs a tool's `work()` and returns its exit code (module docstring); an error a
  user can act on, a requested stop or Ctrl-C ends it in one line."""
  try:
    work()
  except Stopped as e:
    print(e, file=sys.stderr, flush=True)
    return e.exit_code
  except KeyboardInterrupt:
    print("Interrupted.", file=sys.stderr, flush=True)
    return 128 + signal.SIGINT
  except FloatingPointError as e:
    print_error(e, verbose=verbose)
    return EXIT_DIVERGED
  except ERRORS as e:
    print_error(e, verbose=verbose)
    return EXIT_ERROR
  return EXIT_OK


def usage_error(message: str) -> NoReturn:
  """Bad command-line arguments of an absl tool: `error: <message>`, exit code 2."""
  print_error(message)
  sys.exit(EXIT_USAGE)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--verbose", action="store_true",
                      help="On an error, print its traceback too.")


# --------------------------------------------------------------------------
# Command-line flags of the absl tools (main, demo, build_dataset).


def _config_spec(argv) -> str | None:
  """The value of --config (file[:args]) on the command line."""
  spec = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg[len("--config="):]
  return spec


def _config_file(argv) -> object | None:
  """The config named by --config, loaded again to name its fields in an error."""
  spec = _config_spec(argv)
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # the flag error is reported anyway
    return None


def _config_override_error(argv) -> str | None:
  """Names the first --config.<a>.<b> override that is not a field of the config."""
  config = _config_file(argv)
  if config is None:
    return None
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    parts = arg[len("--config."):].split("=", 1)[0].split(".")
    node = config
    for i, part in enumerate(parts):
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in fields:
        where = ".".join(parts[:i]) or "the config"
        expected = (f"its fields are {', '.join(fields)}" if fields
                    else f"{where} is a value, not a section")
        return f"{arg}: unknown config key; {where} has no field {part!r} ({expected})."
      node = node[part]
  return None


_HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for app.run(flags_parser=...): a bad flag, config file or
  --config.<key> override is reported in one line, naming the key and the fields there
  are."""
  FLAGS = flags.FLAGS
  try:
    try:
      remaining = FLAGS(argv)
    except SystemExit as e:  # absl exits with 1 after printing --help; asked for: 0
      if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
        sys.exit(EXIT_OK)
      raise
    config = FLAGS["config"].value if "config" in FLAGS else None
    if hasattr(config, "keys"):
      config.keys()  # a config file that failed to load raises only when used
    return remaining
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    usage_error(f"--config={_config_spec(argv)}: {lines[-1]}")
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e)
    if "Error whilst parsing config file" in message:  # the config module's own error
      lines = [line.strip() for line in message.splitlines() if line.strip()]
      message = f"{lines[0].split(':')[0]}: {lines[-1]}"
    elif not isinstance(e, flags.IllegalFlagValueError):
      message = _config_override_error(argv) or message
    usage_error(message.strip().strip('"'))
