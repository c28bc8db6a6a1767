"""The CPU demo behind `make demo`: train on synthetic vehicles, then put the result in context.

    python -m musp_jax.demo --workdir workdirs/demo

Trains configs/synthetic.py (the dataset is rendered on first use), then evaluates the
same model with random weights and a raw-pixel nearest-neighbour search on the same
query/gallery split, so the trained mAP can be read against both; prints the attention
scores against the ground-truth part masks (musp_jax/attention_scores.py) of the
trained and the random model. Ends with pictures, and as every tool does
(musp_jax/runtime/cli.py).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from musp_jax.runtime import cli
from musp_jax.runtime import process

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/demo", "Where logs, checkpoints and results go.")
flags.DEFINE_bool("verbose", False, "On an error, print its traceback too.")
config_flags.DEFINE_config_file("config", "configs/synthetic.py", "The demo config.",
                                lock_config=True)


def raw_pixel_features(source, size: int = 32):
  """Each image as one L2-normalised vector of its downscaled pixels: (N, 1, 3*size^2)."""
  import io

  import numpy as np
  from PIL import Image
  feats = np.stack([
      np.asarray(Image.open(io.BytesIO(source[i]["image"])).convert("RGB")
                 .resize((size, size), Image.BILINEAR), np.float32).reshape(-1)
      for i in range(len(source))])
  feats -= feats.mean(axis=1, keepdims=True)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12
  return {"feats": feats[:, None, :], "areas": np.ones((len(feats), 1), np.float32)}


def reference_rows(config, mesh) -> tuple[dict, dict | None]:
  """mAP of the same model with random weights, and of raw-pixel nearest neighbours;
  and the random model's attention scores (None without part masks)."""
  from musp_jax.training import attention_scores
  from musp_jax.data import datasets
  from musp_jax.data import training_set
  from musp_jax.training import evaluator
  from musp_jax.retrieval import protocols
  from musp_jax.retrieval import saved_features
  from musp_jax.core import state
  from musp_jax.models import build_model

  target = datasets.eval_sets(config)[0]
  model = build_model(config.model, training_set.load(config).num_classes)
  random_variables = state.init_variables(model, config.input.image_size, config.seed)
  random_rows = evaluator.evaluate_model(model, random_variables, config, mesh)
  pixels = {}
  data_dir = config.dataset.data_dir
  for role, split in target.splits.items():
    raw = raw_pixel_features(target.entry.load_split(split, data_dir))
    index = target.entry.split_index(split, data_dir)
    pixels[role] = saved_features.Features(raw["feats"], raw["areas"], index["vehicle_id"],
                                      index["camera_id"])
  pixel_rows = protocols.run_protocol(target.protocol, pixels, name=target.row_name,
                                      eval_config=config.eval)
  return ({"random weights": next(iter(random_rows.values())),
           "raw-pixel NN": next(iter(pixel_rows.values()))},
          random_rows.get(attention_scores.ROW))


# Below this mean image dependence the maps are a fixed grid, the same for every image.
POSITIONAL = 0.05


def attention_verdict(attention: dict) -> str:
  """One line: whether the maps move with the image, and where the conditions are."""
  dependence = attention["image_dependence"]
  if dependence < POSITIONAL:
    return (f"These maps do not follow the vehicle: image dependence {100 * dependence:.1f}%,"
            " a fixed grid the same for every image. The conditions under which MUSP's "
            "maps follow the vehicle and its parts are the soft-partition study: README, "
            "\"Synthetic vehicles\" (scripts/ablation.py --runner core).")
  return (f"These maps move with the image (image dependence {100 * dependence:.1f}%); how "
          "far they follow the vehicle and its parts, and under which conditions, is the "
          "soft-partition study: README, \"Synthetic vehicles\".")


def main(argv) -> int:
  if len(argv) > 1:
    cli.usage_error(f"unexpected arguments: {argv[1:]}")
  process.setup()
  return cli.run(lambda: run_demo(FLAGS.config, FLAGS.workdir), verbose=FLAGS.verbose)


def run_demo(config, workdir: str) -> None:
  """Trains, evaluates the references, writes demo_summary.md and the pictures."""
  from musp_jax.runtime import writing
  from musp_jax.serving import inference
  from musp_jax.training import attention_scores
  from musp_jax.training import evaluator
  from musp_jax.training import model_pictures
  from musp_jax.training import train

  results = train.train_and_evaluate(config, workdir)
  trained = next(iter(results["results"].values()))
  references, random_attention = reference_rows(config, process.make_mesh())
  rows = {"MUSP trained (this run)": trained, **references}
  table = evaluator.markdown_table({"step": results["step"], "results": rows})
  ratio = trained["mAP"] / max(rows["random weights"]["mAP"], 1e-12)
  pixel_map = rows["raw-pixel NN"]["mAP"]
  summary = (f"{table}\nTrained / random-weights mAP: {ratio:.1f}x; trained / raw-pixel "
             f"mAP: {trained['mAP'] / max(pixel_map, 1e-12):.1f}x "
             f"({100 * (trained['mAP'] - pixel_map):+.1f} points)\n")
  attention = results["results"].get(attention_scores.ROW)
  if attention is not None:
    summary += ("\nAttention against the ground-truth part masks (%; "
                "musp_jax/training/attention_scores.py):\n\n"
                + attention_scores.summary_table({"MUSP trained (this run)": attention,
                                                   "random weights": random_attention})
                + "\n" + attention_scores.markdown(attention)
                + "\n" + attention_verdict(attention) + "\n")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  writing.write_text(os.path.join(workdir, "demo_summary.md"), summary)
  pictures = model_pictures.demo_pictures(inference.load_model(workdir),
                                          os.path.join(workdir, "pictures"))
  print("\n" + summary)
  print(f"TensorBoard logs:  tensorboard --logdir {workdir}")
  print(f"Checkpoints:       {workdir}/checkpoints")
  print(f"Results:           {workdir}/results.md, {workdir}/results.json, {workdir}/demo_summary.md")
  for picture in pictures:
    print(f"Picture:           {picture}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
