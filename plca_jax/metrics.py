"""clu metrics: averaged loss terms, and the segmentation confusion matrix.

Steps return `single_from_model_output(...)` collections; the training loop
merges them and computes on host only at log steps.
"""

import flax
from clu import metrics
import jax.numpy as jnp
import numpy as np

from plca_jax.data import labels as labels_lib


def train_collection(names):
  """A clu Collection class averaging each named scalar."""
  return metrics.Collection.create(
      **{name: metrics.Average.from_output(name) for name in names})


def confusion_matrix(labels, predictions, num_classes, mask=None,
                     ignore_label=labels_lib.IGNORE):
  """(num_classes, num_classes) counts, rows = label, columns = prediction.

  Args:
    labels: (N, H, W) int; `ignore_label` pixels are not counted.
    predictions: (N, H, W) int.
    mask: optional (N,) bool; False images (padding) are not counted.
  """
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_label
  if mask is not None:
    valid = valid & mask[:, None, None]
  # Invalid pixels go to an extra bin that is dropped; int32 counts are
  # exact per batch, and the evaluation loop sums them on host in int64.
  size = num_classes * num_classes
  index = jnp.where(valid, labels * num_classes + predictions, size)
  counts = jnp.bincount(index.reshape(-1), length=size + 1)[:size]
  return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion, class_names):
  """Per-class IoU, mIoU (and mIoU13 for 16 classes), pixel accuracy.

  A class absent from both labels and predictions has IoU NaN and is left
  out of the means (docs/method.md, Evaluation).

  Returns:
    dict of Python floats: "miou", "pixel_accuracy", optionally "miou13",
    and "iou/<name>" per class.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  scores = {"miou": float(np.nanmean(iou)) if np.any(union > 0) else np.nan,
            "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1))}
  if len(class_names) == 16:
    sub = iou[list(labels_lib.MIOU13_INDICES)]
    scores["miou13"] = (float(np.nanmean(sub)) if np.any(~np.isnan(sub))
                        else np.nan)
  for name, value in zip(class_names, iou):
    scores[f"iou/{name}"] = float(value)
  return scores


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
  """Sums confusion matrices over evaluation batches.

  Merge on host after `jax.device_get` (`np.int64` sums stay exact over a
  whole validation set; int32 on device could overflow).
  """
  matrix: jnp.ndarray

  def merge(self, other):
    return type(self)(matrix=np.asarray(self.matrix, np.int64) +
                      np.asarray(other.matrix, np.int64))

  def compute(self):
    return self.matrix
