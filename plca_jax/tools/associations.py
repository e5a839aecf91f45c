r"""Draw the pixel-level cycle associations of a trained model.

    python -m plca_jax.tools.associations --config=configs/demo.py \
        --checkpoint=/tmp/plca_demo --out=/tmp/plca_assoc [--pairs=4]

For --pairs random source/target pairs (source from config.data.source,
target from config.data.target, with its labels when the dataset has them)
this computes the feature (cos, L_fass) and class (kl, L_cass) associations
exactly as training does (`losses.cycle_association` with config.loss:
spatial aggregation, alpha, ignore label) and writes, per pair,
`pair_XX.png`:
  - per metric, the source and target images side by side with a sample of
    cycles i -> j* -> i*: a solid line from i to j*, a thin dashed line
    back to i*. Green: the cycle is consistent (i* has i's class); red: it
    is not. With target labels the marker at j* is a dot when j* really has
    i's class and a cross when it does not;
  - per metric, for the most frequent source classes, where that class's
    associations land on the target (counts of j* per target pixel).
It prints and writes (stats.json, confusion_<metric>.csv) the statistics
of `losses.association_statistics` over all pairs, per metric, and per
source class the share of consistent cycles whose j* has the right class,
with the full source-class x target-class table.

Images are prepared deterministically like training crops: the shorter edge
resized to the middle of [resize_min, resize_max], then a centre crop. The
network runs with BatchNorm running statistics (--batch_norm=running) or,
as in training, statistics of the batch of pairs (--batch_norm=batch).
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from ml_collections import config_flags
from plca_jax import checkpointing
from plca_jax import losses
from plca_jax import models
from plca_jax.data import input_pipeline
from plca_jax.data import labels as labels_lib
from plca_jax.data import transforms
from plca_jax.data.sources import base

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

METRICS = (("fass", "cos", "features"), ("cass", "kl", "logits"))

def prepare(element, config):
  """Deterministic training-like crop: shorter edge to the middle of the
  resize range, centre crop (padded with IGNORE if smaller)."""
  data = config.data
  h, w = transforms.shorter_edge_size(
      *element["label"].shape, (data.resize_min + data.resize_max) // 2)
  image = transforms.resize_image(element["image"], h, w)
  label = transforms.resize_label(element["label"], h, w)
  ch, cw = data.crop_size
  image = np.pad(image, ((0, max(ch - h, 0)), (0, max(cw - w, 0)), (0, 0)))
  label = np.pad(label, ((0, max(ch - h, 0)), (0, max(cw - w, 0))),
                 constant_values=labels_lib.IGNORE)
  top, left = (image.shape[0] - ch) // 2, (image.shape[1] - cw) // 2
  return (image[top:top + ch, left:left + cw],
          label[top:top + ch, left:left + cw])


def _target_source(config):
  """The target dataset with labels if it has them (flag, source)."""
  try:
    return True, input_pipeline.create_labelled_source(
        config.data.target, config.data, config.model.num_classes)
  except base.DatasetError as e:
    print(f"target labels unavailable ({e}); drawing without them")
    return False, input_pipeline.create_source(
        config.data.target, config.data, config.model.num_classes)


def load_pairs(config, num_pairs, seed):
  """(source images, source labels, target images, target labels or None,
  names) of `num_pairs` random pairs, prepared like training crops."""
  source = input_pipeline.create_source(config.data.source, config.data,
                                        config.model.num_classes)
  has_labels, target = _target_source(config)
  rng = np.random.default_rng(seed)
  si = rng.choice(len(source), num_pairs, replace=num_pairs > len(source))
  ti = rng.choice(len(target), num_pairs, replace=num_pairs > len(target))
  out = {"source_image": [], "source_label": [], "target_image": [],
         "target_label": [], "names": []}
  for s, t in zip(si, ti):
    es, et = source[s], target[t]
    img, lab = prepare(es, config)
    out["source_image"].append(img)
    out["source_label"].append(lab)
    img, lab = prepare(et, config)
    out["target_image"].append(img)
    out["target_label"].append(lab)
    out["names"].append((es["name"], et["name"]))
  out = {k: np.stack(v) if k != "names" else v for k, v in out.items()}
  if not has_labels:
    out["target_label"] = None
  return out


def compute(config, variables, pairs, batch_norm="running"):
  """Model outputs and both associations of the pairs, as training does.

  Returns:
    dict metric name -> {"assoc": cycle_association result (NumPy),
    "stats": association_statistics, "confusion": (M, M) or None,
    "grid": (h, w), "target_grid_labels": (N, h*w) or None}.
  """
  model = models.get_model(config)
  train = batch_norm == "batch"

  def forward(images):
    x = transforms.network_input(images, config.data)
    if train:
      out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return out
    return model.apply(variables, x, train=False)

  forward = jax.jit(forward)
  out_s = forward(pairs["source_image"])
  out_t = forward(pairs["target_image"])
  grid = out_s["logits"].shape[1:3]
  source_grid = losses.downsample_labels(
      jnp.asarray(pairs["source_label"], jnp.int32), grid)
  target_grid = None
  if pairs["target_label"] is not None:
    target_grid = losses.downsample_labels(
        jnp.asarray(pairs["target_label"], jnp.int32),
        out_t["logits"].shape[1:3]).reshape(len(source_grid), -1)
  c = config.loss
  results = {}
  for name, metric, key in METRICS:
    s, t = out_s[key], out_t[key]
    if key == "logits":
      s, t = jax.nn.softmax(s, axis=-1), jax.nn.softmax(t, axis=-1)
    assoc = jax.jit(lambda s, t, y, metric=metric: losses.cycle_association(
        s, t, y, metric, aggregate_target=c.aggregate_target, alpha=c.alpha,
        ignore_label=c.ignore_label, chunk_size=losses.chunk_for(
            c.chunk_size, c.chunk_above_pixels, s, t),
        sim_plca=c.sim_plca))(s, t, source_grid)
    stats = losses.association_statistics(
        assoc, t.shape[1] * t.shape[2], target_grid, c.ignore_label)
    confusion = None
    if target_grid is not None:
      confusion = np.asarray(losses.association_confusion(
          assoc, target_grid, config.model.num_classes, c.ignore_label))
    results[name] = {
        "assoc": jax.tree.map(np.asarray, assoc),
        "stats": {k: float(v) for k, v in stats.items()},
        "confusion": confusion, "grid": tuple(grid),
        "target_grid": tuple(out_t["logits"].shape[1:3]),
        "target_grid_labels": (None if target_grid is None
                               else np.asarray(target_grid))}
  return results


def per_class_table(confusion, class_names):
  """Rows (class, consistent cycles with labelled j*, % correct, most
  frequent wrong target class) for classes with any such cycle."""
  rows = []
  for c, name in enumerate(class_names):
    total = int(confusion[c].sum())
    if not total:
      continue
    wrong = confusion[c].copy()
    wrong[c] = 0
    worst = (f"{class_names[int(np.argmax(wrong))]} "
             f"({100 * wrong.max() / total:.1f}%)") if wrong.any() else "-"
    rows.append((name, total, 100.0 * confusion[c, c] / total, worst))
  return rows


def _centres(index, grid, image_shape):
  """Pixel centres (x, y) on the image of flattened grid indices."""
  h, w = grid
  ys, xs = np.divmod(np.asarray(index), w)
  return ((xs + 0.5) * image_shape[1] / w, (ys + 0.5) * image_shape[0] / h)


def draw_pair(path, k, pairs, results, config, num_cycles, seed):
  """Writes the figure of pair `k`; returns the path."""
  names = labels_lib.CLASS_NAMES[config.model.num_classes]
  src, tgt = pairs["source_image"][k], pairs["target_image"][k]
  width = src.shape[1]
  n_cls = 5
  fig = plt.figure(figsize=(16, 5.2 * len(results)), dpi=80)
  grid_spec = fig.add_gridspec(2 * len(results), n_cls,
                               height_ratios=[2.2, 1] * len(results))
  rng = np.random.default_rng([seed, k])
  for row, (name, r) in enumerate(results.items()):
    a = r["assoc"]
    valid = np.flatnonzero(a["valid"][k])
    ax = fig.add_subplot(grid_spec[2 * row, :])
    ax.imshow(np.concatenate([src, tgt], axis=1))
    ax.axvline(width - 0.5, color="white", lw=2)
    labels_t = r["target_grid_labels"]
    sample = rng.choice(valid, min(num_cycles, len(valid)), replace=False) \
        if len(valid) else []
    for i in sample:
      j, back = a["j_star"][k, i], a["i_star"][k, i]
      ok = bool(a["selected"][k, i])
      colour = "#1a9850" if ok else "#d73027"
      xi, yi = _centres(i, r["grid"], src.shape)
      xj, yj = _centres(j, r["target_grid"], tgt.shape)
      xb, yb = _centres(back, r["grid"], src.shape)
      ax.plot([xi, xj + width], [yi, yj], color=colour, lw=1.2, alpha=0.85)
      ax.plot([xj + width, xb], [yj, yb], color=colour, lw=0.6, ls="--",
              alpha=0.6)
      ax.plot([xi], [yi], "o", color=colour, ms=3)
      marker = "o"
      if labels_t is not None:
        right = labels_t[k, j] == a["source_labels"][k, i]
        marker = "o" if right else "x"
      ax.plot([xj + width], [yj], marker, color=colour, ms=6, mew=2)
    s = r["stats"]
    title = (f"{name} ({dict(fass='features, cos', cass='classes, kl')[name]})"
             f": consistent {100 * s['consistent']:.1f}% of valid source "
             f"pixels, target pixels reached {100 * s['reached']:.1f}%")
    if "correct" in s:
      title += f", j* of the right class {100 * s['correct']:.1f}%"
    ax.set_title(title + "   (all pairs; green = consistent, red = not; "
                 "at j*: dot = right class, x = wrong)", fontsize=9)
    ax.set_axis_off()
    # Where the associations of each frequent source class land.
    y = a["source_labels"][k]
    classes = [c for c in np.argsort(-np.bincount(
        y[a["valid"][k]], minlength=len(names))) if np.any(y == c)][:n_cls]
    th, tw = r["target_grid"]
    for col in range(n_cls):
      ax = fig.add_subplot(grid_spec[2 * row + 1, col])
      ax.set_axis_off()
      if col >= len(classes):
        continue
      c = classes[col]
      mask = a["valid"][k] & (y == c)
      counts = np.bincount(a["j_star"][k][mask], minlength=th * tw)
      heat = counts.reshape(th, tw).astype(float)
      ax.imshow(tgt.mean(axis=-1), cmap="gray", vmin=0, vmax=255)
      ax.imshow(np.ma.masked_equal(heat, 0), cmap="YlOrRd", vmin=0,
                vmax=max(heat.max(), 1), alpha=0.9,
                extent=(-0.5, tgt.shape[1] - 0.5, tgt.shape[0] - 0.5, -0.5),
                interpolation="nearest")
      ax.set_title(f"{name}: {names[c]} ({int(mask.sum())} px) lands on",
                   fontsize=8)
  fig.suptitle(f"pair {k}: source {pairs['names'][k][0]} | target "
               f"{pairs['names'][k][1]}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def run(config, checkpoint, out, num_pairs=4, num_cycles=40, seed=0,
        batch_norm="running"):
  """Everything the command does; returns (figure paths, stats dict)."""
  os.makedirs(out, exist_ok=True)
  model = models.get_model(config)
  init = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, *config.data.crop_size, 3))), jax.random.key(0))
  variables = checkpointing.load_variables(checkpoint, init)
  pairs = load_pairs(config, num_pairs, seed)
  results = compute(config, variables, pairs, batch_norm)
  names = labels_lib.CLASS_NAMES[config.model.num_classes]
  paths = [draw_pair(os.path.join(out, f"pair_{k:02d}.png"), k, pairs,
                     results, config, num_cycles, seed)
           for k in range(num_pairs)]
  summary = {}
  for name, r in results.items():
    summary[name] = dict(r["stats"])
    print(f"{name}: " + ", ".join(f"{k} {100 * v:.1f}%"
                                  for k, v in r["stats"].items()))
    if r["confusion"] is not None:
      rows = per_class_table(r["confusion"], names)
      summary[name]["per_class"] = [
          {"class": c, "cycles": n, "correct": p, "most_wrong": w}
          for c, n, p, w in rows]
      print(f"  {'source class':<14}{'cycles':>8}{'correct':>9}  "
            "most frequent wrong target class")
      for c, n, p, w in rows:
        print(f"  {c:<14}{n:>8}{p:>8.1f}%  {w}")
      with open(os.path.join(out, f"confusion_{name}.csv"), "w") as f:
        f.write("source_class\\target_class," + ",".join(names) + "\n")
        for c, row in zip(names, r["confusion"]):
          f.write(c + "," + ",".join(str(int(v)) for v in row) + "\n")
  with open(os.path.join(out, "stats.json"), "w") as f:
    json.dump({"pairs": [list(n) for n in pairs["names"]], **summary}, f,
              indent=1)
  print(f"wrote {len(paths)} figures to {out}")
  return paths, summary


def _define_flags():
  """Flags of the command (defined only when run as a program, so that the
  module imports next to plca_jax.main, which defines --config too)."""
  flags.DEFINE_string("checkpoint", None, "A plca_jax workdir (latest "
                      "checkpoint) or a directory written by plca_jax.convert.")
  flags.DEFINE_string("out", None, "Output directory (created).")
  flags.DEFINE_integer("pairs", 4, "Source/target pairs to draw.")
  flags.DEFINE_integer("cycles", 40, "Cycles drawn per pair.")
  flags.DEFINE_integer("seed", 0, "Chooses the pairs and cycles.")
  flags.DEFINE_enum("batch_norm", "running", ["running", "batch"],
                    "BatchNorm statistics for the forward pass.")
  config_flags.DEFINE_config_file("config", None, "Config file.",
                                  lock_config=False)


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("config", "checkpoint", "out"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  run(f.config, f.checkpoint, f.out, f.pairs, f.cycles, f.seed, f.batch_norm)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
