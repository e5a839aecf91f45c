r"""Which classes random source/target pairs share (the replication's table).

    python -m plca_jax.tools.class_overlap --config=configs/synthia.py \
        --pairs=30000 --out=/tmp/plca_overlap

Reads every label of config.data.source and of the labelled target
(config.data.target with its labels; --target=eval uses config.data.eval),
once, into class sets (a class is present with >= --min_pixels pixels),
then over --pairs random (source, target) pairs counts
  - per class: how often it appears in the target but not in the source,
    in the source but not in the target, and in both;
  - the distribution of the number of classes a pair shares.
Writes class_overlap.csv, shared_classes.csv and class_overlap.png (bar
charts), and prints both tables.
"""

import os

from absl import app
from absl import flags
import matplotlib
import numpy as np

from ml_collections import config_flags
from plca_jax.data import input_pipeline
from plca_jax.data import labels as labels_lib
from plca_jax.data import pairing

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top


def overlap_counts(source_sets, target_sets, num_pairs, seed=0):
  """Counts over `num_pairs` random pairs (uniform, with replacement).

  Returns:
    dict: "target_only", "source_only", "both" (M,) int64 per class;
    "shared" (M + 1,) int64 histogram of shared-class counts.
  """
  rng = np.random.default_rng(seed)
  si = rng.integers(0, len(source_sets), num_pairs)
  ti = rng.integers(0, len(target_sets), num_pairs)
  s, t = source_sets[si], target_sets[ti]
  m = source_sets.shape[1]
  return {"target_only": np.sum(t & ~s, axis=0, dtype=np.int64),
          "source_only": np.sum(s & ~t, axis=0, dtype=np.int64),
          "both": np.sum(s & t, axis=0, dtype=np.int64),
          "shared": np.bincount(np.sum(s & t, axis=1), minlength=m + 1)}


def write(out, counts, num_pairs, class_names):
  """CSV files and the bar-chart PNG; returns their paths."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, n) for n in
           ("class_overlap.csv", "shared_classes.csv", "class_overlap.png")]
  with open(paths[0], "w") as f:
    f.write("class,target_not_source,source_not_target,both,"
            "target_not_source_share\n")
    for c, name in enumerate(class_names):
      f.write(f"{name},{counts['target_only'][c]},"
              f"{counts['source_only'][c]},{counts['both'][c]},"
              f"{counts['target_only'][c] / num_pairs:.6f}\n")
  with open(paths[1], "w") as f:
    f.write("shared_classes,pairs,share\n")
    for k, n in enumerate(counts["shared"]):
      f.write(f"{k},{n},{n / num_pairs:.6f}\n")
  fig, (a, b) = plt.subplots(1, 2, figsize=(15, 4.8), dpi=90,
                             gridspec_kw={"width_ratios": [2.2, 1]})
  x = np.arange(len(class_names))
  a.bar(x - 0.2, 100 * counts["target_only"] / num_pairs, 0.4,
        label="in target, not in source", color="#d73027")
  a.bar(x + 0.2, 100 * counts["source_only"] / num_pairs, 0.4,
        label="in source, not in target", color="#4575b4")
  a.set_xticks(x, class_names, rotation=60, ha="right")
  a.set_ylabel("% of pairs")
  a.set_title(f"classes one image of a pair lacks ({num_pairs} random pairs)")
  a.legend()
  k = np.arange(len(counts["shared"]))
  b.bar(k, 100 * counts["shared"] / num_pairs, color="#1a9850")
  mean = np.sum(k * counts["shared"]) / num_pairs
  b.set_xlabel("classes shared by source and target")
  b.set_ylabel("% of pairs")
  b.set_title(f"shared classes per pair (mean {mean:.2f})")
  fig.tight_layout()
  fig.savefig(paths[2])
  plt.close(fig)
  return paths


def run(config, num_pairs, out, seed=0, target="train", min_pixels=1):
  """Everything the command does; returns (counts, paths)."""
  m = config.model.num_classes
  source = input_pipeline.create_source(config.data.source, config.data, m)
  target_ds = input_pipeline.create_labelled_source(
      config.data.target if target == "train" else config.data.eval,
      config.data, m)
  source_sets = pairing.class_sets(source, m, min_pixels=min_pixels)
  target_sets = pairing.class_sets(target_ds, m, min_pixels=min_pixels)
  counts = overlap_counts(source_sets, target_sets, num_pairs, seed)
  names = labels_lib.CLASS_NAMES[m]
  paths = write(out, counts, num_pairs, names)
  print(f"{num_pairs} random pairs of {len(source)} source and "
        f"{len(target_ds)} target images")
  print(f"{'class':<14}{'target, not source':>20}{'source, not target':>20}")
  for c, name in enumerate(names):
    print(f"{name:<14}{100 * counts['target_only'][c] / num_pairs:>19.1f}%"
          f"{100 * counts['source_only'][c] / num_pairs:>19.1f}%")
  print("shared classes: " + ", ".join(
      f"{k}: {100 * n / num_pairs:.1f}%"
      for k, n in enumerate(counts["shared"]) if n))
  print("wrote " + ", ".join(paths))
  return counts, paths


def _define_flags():
  flags.DEFINE_integer("pairs", 30000, "Random source/target pairs.")
  flags.DEFINE_string("out", None, "Output directory (created).")
  flags.DEFINE_integer("seed", 0, "Chooses the pairs.")
  flags.DEFINE_enum("target", "train", ["train", "eval"],
                    "Target labels from config.data.target or .eval.")
  flags.DEFINE_integer("min_pixels", 1, "Pixels for a class to count.")
  config_flags.DEFINE_config_file("config", None, "Config file.",
                                  lock_config=False)


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("config", "out"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  run(f.config, f.pairs, f.out, f.seed, f.target, f.min_pixels)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
