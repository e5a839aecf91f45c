r"""MBT: multi-band transfer pseudo-labels (FDA's self-training round).

Averages the softmax of several trained models (FDA's three betas, weights
1/3 each) on every target training image and writes pseudo-labels with the
authors' class-wise threshold (`getSudoLabel_multi.py`): per class, the
value at sorted position round(0.66 n) of the maximum probability over the
n pixels predicted as that class (all images together), capped at 0.9;
pixels below their class's threshold become 255.

    python -m plca_jax.methods.mbt --config=configs/demo.py \
      --config.method=fda --workdirs=W1,W2,W3 --out=DIR

Then train the self-training round with
`--config.fda.pseudo_label_dir=DIR` (docs/methods.md).

Images are predicted at `config.data.eval_image_size` (the authors: the
network input size, 512x1024 on Cityscapes) and the pseudo-labels written
at that size; the reader resizes them (nearest) to each image. To bound
memory over a whole dataset, probabilities are counted in 2^16 bins per
class, so a threshold is exact up to 1/65536; a class with a single pixel
takes that pixel's value (the authors' index round(0.66) = 1 would fail).
"""

import os
import shutil

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image

from plca_jax import checkpointing
from plca_jax import losses
from plca_jax.data import input_pipeline
from plca_jax.data import labels as labels_lib
from plca_jax.data import transforms
from plca_jax.methods import pseudo_labels

BINS = 2**16
PERCENTILE = 0.66
CAP = 0.9


def quantize(prob):
  """Probabilities in [0, 1] -> bin indices 0..BINS-1 (uint16)."""
  q = np.floor(np.asarray(prob, np.float64) * BINS)
  return np.clip(q, 0, BINS - 1).astype(np.uint16)


def class_thresholds(hist, percentile=PERCENTILE, cap=CAP):
  """(M,) thresholds from (M, BINS) counts of quantised max-probabilities.

  Class c: its n pixels' values sorted ascending, the one at index
  min(round(percentile * n), n - 1) (NumPy's round, as the authors), as
  the lower edge of its bin, capped at `cap`; 0 for a class with no pixel.
  """
  thresholds = np.zeros(hist.shape[0])
  for c, counts in enumerate(hist):
    n = int(counts.sum())
    if n == 0:
      continue
    index = min(int(np.round(n * percentile)), n - 1)
    position = int(np.searchsorted(np.cumsum(counts), index + 1))
    thresholds[c] = min(position / BINS, cap)
  return thresholds


def apply_thresholds(label, q, thresholds):
  """label (H, W) uint8 with pixels below their class's threshold -> 255."""
  label = np.asarray(label, np.uint8).copy()
  low = q.astype(np.float64) / BINS < thresholds[label]
  label[low] = labels_lib.IGNORE
  return label


def make_predictor(config, model):
  """jit: (variables, uint8 image (1, h, w, 3)) -> softmax (1, h, w, M)."""

  def predict(variables, image):
    x = transforms.network_input(image, config.data)
    logits = losses.at_least_f32(model.apply(variables, x)["logits"])
    up = losses.upsample_bilinear(logits, image.shape[1:3])
    return jax.nn.softmax(up, axis=-1)

  return jax.jit(predict)


def write_pseudo_labels(config, model, workdirs, out, weights=None):
  """Predicts the target training images with every model, writes labels.

  Returns:
    (M,) the class thresholds used.
  """
  weights = (np.full(len(workdirs), 1.0 / len(workdirs)) if weights is None
             else np.asarray(weights, np.float64))
  num_classes = config.model.num_classes
  source = input_pipeline.create_source(config.data.target, config.data,
                                        num_classes)
  size = tuple(config.data.eval_image_size)
  resize = transforms.ResizeImage(*size)
  init = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, *size, 3))), jax.random.key(0))
  variables = [checkpointing.load_variables(w, init) for w in workdirs]
  predict = make_predictor(config, model)
  raw = os.path.join(out, ".raw")
  hist = np.zeros((num_classes, BINS), np.int64)
  names = []
  for index in range(len(source)):  # pass 1: predictions and histograms
    element = source[index]
    image = resize.map(element)["image"][None]
    probs = sum(w * np.asarray(predict(v, image)[0], np.float64)
                for w, v in zip(weights, variables))
    label = np.argmax(probs, axis=-1).astype(np.uint8)
    q = quantize(np.max(probs, axis=-1))
    hist += np.stack([np.bincount(q[label == c], minlength=BINS)
                      for c in range(num_classes)])
    pseudo_labels.write(raw, element["name"], label)
    path = pseudo_labels.path_of(raw, element["name"]) + ".q.png"
    Image.fromarray(q).save(path)  # 16-bit PNG
    names.append(element["name"])
    if index % 100 == 0:
      logging.info("MBT: predicted %d / %d", index + 1, len(source))
  thresholds = class_thresholds(hist)
  for name in names:  # pass 2: thresholds
    path = pseudo_labels.path_of(raw, name)
    label = np.asarray(Image.open(path))
    q = np.asarray(Image.open(path + ".q.png")).astype(np.uint16)
    pseudo_labels.write(out, name, apply_thresholds(label, q, thresholds))
  shutil.rmtree(raw)
  return thresholds


FLAGS = flags.FLAGS


def _define_flags():
  # In __main__ only, so that other command lines (plca_jax.recipes) can
  # import this module and define their own --config.
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                  lock_config=True)
  flags.DEFINE_list("workdirs", None, "Workdirs (or converted checkpoints) "
                    "of the models to average, e.g. FDA's three betas.")
  flags.DEFINE_list("weights", None, "Their weights (default: equal).")
  flags.DEFINE_string("out", None, "Directory for the pseudo-label PNGs.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from plca_jax import methods  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  model = methods.get_method(config).model
  weights = [float(w) for w in FLAGS.weights] if FLAGS.weights else None
  if weights is not None and len(weights) != len(FLAGS.workdirs):
    raise app.UsageError(f"--weights has {len(weights)} values for "
                         f"{len(FLAGS.workdirs)} --workdirs")
  thresholds = write_pseudo_labels(config, model, FLAGS.workdirs, FLAGS.out,
                                   weights)
  names = labels_lib.CLASS_NAMES[config.model.num_classes]
  print("class thresholds: " + ", ".join(
      f"{n} {t:.3f}" for n, t in zip(names, thresholds)))
  print(f"pseudo-labels written to {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "workdirs", "out"])
  app.run(main)
