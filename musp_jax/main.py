"""Train or evaluate MUSP.

    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776
    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776 --mode=eval

Kept short on purpose: all logic lives in musp_jax.train and is importable and tested.
Errors a user can act on are printed as one line, `error: ...` (--verbose: with the
traceback); an interrupted run exits with 128 + the signal number.
"""

import importlib.util
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming from workdir) or "
                  "evaluate a saved checkpoint.")
flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/veri776.py[:args].",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_file(argv) -> object | None:
  """The config named by --config, loaded again to name its fields in an error."""
  spec = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config="):
      spec = arg[len("--config="):]
  if not spec:
    return None
  path, _, arg = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_config_for_error", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # pylint: disable=broad-except  # the flag error is reported anyway
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


def parse_flags(argv):
  """absl's flag parsing, with a bad flag or config override reported in one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e)
    if "Error whilst parsing config file" in message:  # the config module's own error
      lines = [line.strip() for line in message.splitlines() if line.strip()]
      message = f"{lines[0].split(':')[0]}: {lines[-1]}"
    elif not isinstance(e, flags.IllegalFlagValueError):
      message = _config_override_error(argv) or message
    _fail(message.strip().strip('"'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "train" and FLAGS.step is not None:
    _fail(f"--step={FLAGS.step} is only for --mode=eval; training always resumes from "
          f"the latest checkpoint of --workdir {FLAGS.workdir}.")
  from musp_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.setup()
  from musp_jax import evaluator  # pylint: disable=g-import-not-at-top
  from musp_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  if FLAGS.mode == "train":
    run = lambda: train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    run = lambda: train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step)
  results = runtime.run_entry_point(run, verbose=FLAGS.verbose)
  if results.get("results"):
    print(evaluator.markdown_table(results), flush=True)
  if "not_written" in results:
    print(f"Not written: {results['not_written']}.", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
