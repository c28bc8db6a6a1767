"""Train or evaluate MUSP.

    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776
    python -m musp_jax.main --config configs/veri776.py --workdir workdirs/veri776 --mode=eval

Kept short on purpose: all logic lives in musp_jax.train and is importable and tested.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (resuming from workdir) or "
                  "evaluate a saved checkpoint.")
flags.DEFINE_integer("step", None, "--mode=eval: the checkpoint step (default: latest).")
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/veri776.py[:args].",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from musp_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.setup()
  from musp_jax import train  # pylint: disable=g-import-not-at-top
  logging.info("Config:\n%s", FLAGS.config)
  if FLAGS.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step)


if __name__ == "__main__":
  app.run(main)
