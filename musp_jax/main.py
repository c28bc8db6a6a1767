"""Train or evaluate MUSP.

    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776
    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776 --mode=eval

Kept short on purpose: all logic lives in musp_jax.training.train and is importable and
tested. It ends as every tool does (musp_jax/runtime/cli.py): errors a user can act on
in one line, `error: ...` (--verbose: with the traceback), exit code 1; bad flags 2; a
non-finite loss 3; a run stopped by a signal 128 + the signal number.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from musp_jax.runtime import cli
from musp_jax.runtime import process

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming from workdir) or "
                  "evaluate a saved checkpoint.")
flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/veri776.py[:args].",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    cli.usage_error(f"unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "train" and FLAGS.step is not None:
    cli.usage_error(
        f"--step={FLAGS.step} is only for --mode=eval; training always resumes from the "
        f"latest checkpoint of --workdir {FLAGS.workdir}.")
  process.setup()
  from musp_jax.training import evaluator
  from musp_jax.training import train
  logging.info("Config:\n%s", FLAGS.config)

  def work():
    if FLAGS.mode == "train":
      results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      results = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step)
    if results.get("results"):
      print(evaluator.markdown_table(results), flush=True)
    if "not_written" in results:
      print(f"Not written: {results['not_written']}.", flush=True)

  return cli.run(work, verbose=FLAGS.verbose)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
