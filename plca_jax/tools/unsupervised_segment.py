r"""Unsupervised image segmentation by backpropagation (Kanezaki, ICASSP 2018).

Segments one image with no labels at all:

    python -m plca_jax.tools.unsupervised_segment --image=PATH.png --out=DIR

A small fully convolutional net (`num_convs` x [3x3 conv -> ReLU ->
BatchNorm], then 1x1 conv -> BatchNorm, `channels` responses per pixel) is
trained on the image alone. Each iteration takes the argmax over the
responses as the pixels' cluster labels, refines them with superpixels
(every SLIC superpixel, scikit-image, takes its most frequent label), and
takes one SGD step (lr 0.1, momentum 0.9) on the cross-entropy between the
responses and the refined labels. Iterations stop when the number of
distinct labels falls to `min_labels` (or after `max_iters`). Writes
DIR/<name>_labels.png (segments 0..K-1, uint8 or uint16) and
DIR/<name>_overlay.png (a colour per segment over the image), and prints
the number of segments. As the paper: BatchNorm on batch statistics
throughout, input scaled to [0, 1], 100 channels, 2 3x3 convs, 3 labels,
SLIC with compactness 100 and 10,000 superpixels for an image of the
paper's size (BSD500, 481x321 pixels), i.e. one superpixel per ~15 pixels:
the default count scales with the image (597 for 96x96; `n_segments` sets
it).

Features of a trained plca_jax network instead of the RGB pixels:

    python -m plca_jax.tools.unsupervised_segment --image=PATH.png \
        --out=DIR --config=configs/demo.py --checkpoint=WORKDIR

runs the checkpoint's DeepLab-V2 backbone (evaluation mode) on the image,
upsamples its layer4 features bilinearly to the image size, and trains the
small net on them (same refinement and stopping). `--config` alone with
`--num_images=N` segments the first N images of config.data.eval instead of
`--image` and scores the segments against their labels (best-match mIoU:
for each labelled class the best IoU of any one segment, averaged; and the
adjusted Rand index over labelled pixels).
"""

import functools
import json
import os

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
from PIL import Image
from skimage import segmentation as sk_segmentation

from plca_jax import checkpointing
from plca_jax import models
from plca_jax.data import input_pipeline
from plca_jax.data import labels as labels_lib
from plca_jax.data import transforms


class SegmentationNet(nn.Module):
  """Kanezaki's net: `num_convs` x (3x3 conv, ReLU, BN), 1x1 conv, BN."""
  channels: int = 100
  num_convs: int = 2

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.Conv(self.channels, (3, 3), padding=1, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=False, momentum=0.9,
                       epsilon=1e-5, name=f"bn{i}")(nn.relu(x))
    x = nn.Conv(self.channels, (1, 1), name="conv_out")(x)
    return nn.BatchNorm(use_running_average=False, momentum=0.9,
                        epsilon=1e-5, name="bn_out")(x)


def refine(labels, superpixels, num_superpixels, num_labels):
  """Every superpixel takes its most frequent label (lowest on ties).

  Args:
    labels: (H, W) int cluster labels in [0, num_labels).
    superpixels: (H, W) int superpixel ids in [0, num_superpixels).
  Returns:
    (H, W) int32 refined labels.
  """
  counts = jax.ops.segment_sum(
      jax.nn.one_hot(labels.reshape(-1), num_labels, dtype=jnp.int32),
      superpixels.reshape(-1), num_segments=num_superpixels)
  majority = jnp.argmax(counts, axis=-1).astype(jnp.int32)
  return majority[superpixels]


def cross_entropy(responses, target):
  """Mean over pixels of -log softmax(responses)[target]."""
  logp = jax.nn.log_softmax(responses.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, target[..., None], -1))


@functools.partial(jax.jit, static_argnames=("net", "optimizer",
                                             "num_superpixels"))
def _step(params, batch_stats, opt_state, inputs, superpixels, *, net,
          optimizer, num_superpixels):
  """One iteration: responses -> argmax -> refined target -> SGD step."""
  def loss_fn(p):
    responses, updates = net.apply(
        {"params": p, "batch_stats": batch_stats}, inputs[None],
        mutable=["batch_stats"])
    responses = responses[0]
    labels = jnp.argmax(responses, axis=-1)
    target = refine(labels, superpixels, num_superpixels, net.channels)
    return cross_entropy(responses, jax.lax.stop_gradient(target)), (
        labels, updates["batch_stats"])

  (loss, (labels, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), batch_stats, opt_state, (
      loss, labels)


@functools.lru_cache
def _sgd(learning_rate, momentum):
  """One optax.sgd per setting: `_step` is jitted with the optimizer as a
  static argument, and a fresh one (new closures) would recompile it for
  every image."""
  return optax.sgd(learning_rate, momentum)


# Kanezaki's 10,000 superpixels were for BSD500 images of 481x321 pixels.
PAPER_SUPERPIXELS, PAPER_PIXELS = 10_000, 481 * 321


def default_superpixels(height, width):
  """The paper's superpixel density for an image of this size."""
  return max(1, round(PAPER_SUPERPIXELS * height * width / PAPER_PIXELS))


def superpixels_of(image, n_segments=None, compactness=100.0):
  """(H, W) int32 SLIC superpixel ids 0..S-1 of a uint8 RGB image.

  `n_segments` (about; None or 0: `default_superpixels` of the image).
  """
  if not n_segments:
    n_segments = default_superpixels(*image.shape[:2])
  sp = sk_segmentation.slic(image, n_segments=n_segments,
                            compactness=compactness, start_label=0)
  _, ids = np.unique(sp, return_inverse=True)
  return ids.reshape(sp.shape).astype(np.int32)


def consecutive(labels):
  """Relabels to 0..K-1 in order of first appearance (row-major)."""
  flat = labels.reshape(-1)
  _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
  rank = np.argsort(np.argsort(first))
  return rank[inverse].reshape(labels.shape).astype(np.int32)


def segment(inputs, superpixels, *, channels=100, num_convs=2, min_labels=3,
            max_iters=1000, learning_rate=0.1, momentum=0.9, seed=0,
            log_every=0):
  """Trains the net on one image; returns (labels (H, W) 0..K-1, info).

  Args:
    inputs: (H, W, C) float32 network input (RGB / 255, or features).
    superpixels: (H, W) int32 ids 0..S-1 (`superpixels_of`).
  Returns:
    labels and {"segments": K, "iterations": n, "loss": last loss}.
  """
  net = SegmentationNet(channels, num_convs)
  inputs = jnp.asarray(inputs, jnp.float32)
  variables = net.init(jax.random.key(seed), inputs[None])
  params, batch_stats = variables["params"], variables["batch_stats"]
  optimizer = _sgd(learning_rate, momentum)
  opt_state = optimizer.init(params)
  num_superpixels = int(superpixels.max()) + 1
  superpixels = jnp.asarray(superpixels, jnp.int32)
  labels, loss, it = None, float("nan"), 0
  for it in range(1, max_iters + 1):
    params, batch_stats, opt_state, (loss, labels) = _step(
        params, batch_stats, opt_state, inputs, superpixels, net=net,
        optimizer=optimizer, num_superpixels=num_superpixels)
    count = len(np.unique(np.asarray(labels)))
    if log_every and it % log_every == 0:
      print(f"  iteration {it}: {count} labels, loss {float(loss):.4f}")
    if count <= min_labels:
      break
  labels = consecutive(np.asarray(labels))
  return labels, {"segments": int(labels.max()) + 1, "iterations": it,
                  "loss": float(loss)}


def adjusted_rand_index(a, b):
  """ARI of two labelings (same shape); 1 = identical partitions."""
  a = np.unique(np.asarray(a).reshape(-1), return_inverse=True)[1]
  b = np.unique(np.asarray(b).reshape(-1), return_inverse=True)[1]
  n = a.size
  table = np.zeros((a.max() + 1, b.max() + 1), np.float64)
  np.add.at(table, (a, b), 1)
  comb = lambda x: x * (x - 1) / 2
  index = comb(table).sum()
  rows, cols = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
  expected = rows * cols / comb(n) if n > 1 else 0.0
  top = (rows + cols) / 2
  if top == expected:
    return 1.0
  return float((index - expected) / (top - expected))


def best_match_iou(segments, labels, ignore=labels_lib.IGNORE):
  """{class: best IoU of any one segment} over classes present in `labels`
  (pixels labelled `ignore` left out), and their mean."""
  valid = labels != ignore
  seg, lab = segments[valid], labels[valid]
  out = {}
  for c in np.unique(lab):
    truth = lab == c
    best = 0.0
    for s in np.unique(seg[truth]):
      mine = seg == s
      best = max(best, np.sum(mine & truth) / np.sum(mine | truth))
    out[int(c)] = float(best)
  return out, float(np.mean(list(out.values()))) if out else float("nan")


def overlay(image, segments, alpha=0.5, seed=0):
  """uint8 RGB: a random colour per segment blended over the image."""
  colours = np.random.default_rng(seed).integers(
      0, 256, (int(segments.max()) + 1, 3))
  mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours[segments]
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def write(out, name, image, segments):
  """DIR/<name>_labels.png and DIR/<name>_overlay.png; returns the paths."""
  os.makedirs(out, exist_ok=True)
  dtype = np.uint8 if segments.max() < 256 else np.uint16
  paths = (os.path.join(out, f"{name}_labels.png"),
           os.path.join(out, f"{name}_overlay.png"))
  Image.fromarray(segments.astype(dtype)).save(paths[0])
  Image.fromarray(overlay(image, segments)).save(paths[1])
  return paths


def read_image(path):
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"--image={path!r}: not a readable image ({e})") from e


class FeatureExtractor:
  """A trained plca_jax network's layer4 features, upsampled to the image."""

  def __init__(self, config, checkpoint):
    self.config = config
    self.model = models.get_model(config)
    init = jax.eval_shape(lambda r: self.model.init(
        r, jnp.zeros((1, *config.data.crop_size, 3))), jax.random.key(0))
    self.variables = checkpointing.load_variables(checkpoint, init)
    self._features = jax.jit(self._apply)

  def _apply(self, variables, image):
    x = transforms.network_input(image[None], self.config.data)
    features = self.model.apply(variables, x)["features"][0]
    features = jax.image.resize(features.astype(jnp.float32),
                                (*image.shape[:2], features.shape[-1]),
                                "bilinear")
    # Per-channel standardisation: the small net's first layer sees inputs
    # of unit scale, as it does with RGB / 255.
    mean = jnp.mean(features, axis=(0, 1))
    std = jnp.std(features, axis=(0, 1)) + 1e-5
    return (features - mean) / std

  def __call__(self, image):
    return self._features(self.variables, jnp.asarray(image))


def segment_image(image, extractor=None, *, n_segments=None,
                  compactness=100.0, **kwargs):
  """uint8 RGB image -> (segments, info)."""
  inputs = (image.astype(np.float32) / 255.0 if extractor is None
            else extractor(image))
  return segment(inputs, superpixels_of(image, n_segments, compactness),
                 **kwargs)


def run_on_eval_images(config, out, num_images, extractor=None, **kwargs):
  """Segments the first `num_images` of config.data.eval; scores them."""
  source = input_pipeline.create_labelled_source(
      config.data.eval, config.data, config.model.num_classes)
  scores = []
  for i in range(min(num_images, len(source))):
    element = source[i]
    image, label = element["image"], element["label"]
    segments, info = segment_image(image, extractor, **kwargs)
    per_class, miou = best_match_iou(segments, label)
    valid = label != labels_lib.IGNORE
    ari = adjusted_rand_index(segments[valid], label[valid])
    name = os.path.basename(str(element["name"])).rsplit(".", 1)[0] or str(i)
    write(out, name, image, segments)
    scores.append({"name": str(element["name"]), **info,
                   "best_match_miou": miou, "ari": ari,
                   "per_class": per_class})
    print(f"{element['name']}: {info['segments']} segments after "
          f"{info['iterations']} iterations, best-match mIoU "
          f"{100 * miou:.2f}, ARI {ari:.3f}")
  summary = {"images": scores,
             "mean_best_match_miou": float(np.mean(
                 [s["best_match_miou"] for s in scores])),
             "mean_ari": float(np.mean([s["ari"] for s in scores])),
             "mean_segments": float(np.mean([s["segments"] for s in scores]))}
  with open(os.path.join(out, "scores.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(f"{len(scores)} images: mean best-match mIoU "
        f"{100 * summary['mean_best_match_miou']:.2f}, mean ARI "
        f"{summary['mean_ari']:.3f}, mean segments "
        f"{summary['mean_segments']:.1f}")
  return summary


def _define_flags():
  flags.DEFINE_list("image", None, "Image file(s) to segment (PNG, JPEG).")
  flags.DEFINE_string("out", None, "Output directory (created).")
  config_flags.DEFINE_config_file(
      "config", None, "A plca_jax config: with --checkpoint, its network; "
      "without --image, its evaluation images.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A plca_jax workdir or converted "
                      "checkpoint: segment its features instead of RGB.")
  flags.DEFINE_integer("num_images", 5, "Evaluation images (no --image).")
  flags.DEFINE_integer("channels", 100, "Responses per pixel (max labels).")
  flags.DEFINE_integer("num_convs", 2, "3x3 conv layers.")
  flags.DEFINE_integer("min_labels", 3, "Stop at this many labels.")
  flags.DEFINE_integer("max_iters", 1000, "Stop after this many steps.")
  flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate.")
  flags.DEFINE_integer("n_segments", 0, "SLIC superpixels (about); 0: the "
                       "paper's density, 10,000 for 481x321 pixels.")
  flags.DEFINE_float("compactness", 100.0, "SLIC compactness.")
  flags.DEFINE_integer("seed", 0, "Initialisation of the net.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError("--out is required")
  if f.checkpoint and f.config is None:
    raise app.UsageError("--checkpoint needs --config (its network)")
  if not f.image and f.config is None:
    raise app.UsageError("give --image=PATH, or --config for its "
                         "evaluation images")
  kwargs = dict(channels=f.channels, num_convs=f.num_convs,
                min_labels=f.min_labels, max_iters=f.max_iters,
                learning_rate=f.learning_rate, n_segments=f.n_segments,
                compactness=f.compactness, seed=f.seed)
  extractor = (FeatureExtractor(f.config, f.checkpoint) if f.checkpoint
               else None)
  if not f.image:
    run_on_eval_images(f.config, f.out, f.num_images, extractor, **kwargs)
    return
  for path in f.image:
    image = read_image(path)
    segments, info = segment_image(image, extractor, **kwargs)
    name = os.path.splitext(os.path.basename(path))[0]
    labels_path, overlay_path = write(f.out, name, image, segments)
    print(f"{path}: {info['segments']} segments after {info['iterations']} "
          f"iterations (loss {info['loss']:.4f}); wrote {labels_path}, "
          f"{overlay_path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
