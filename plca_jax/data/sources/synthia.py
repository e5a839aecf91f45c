"""SYNTHIA-RAND-CITYSCAPES (docs/method.md, Data)."""

import os

import cv2
import numpy as np

from plca_jax.data import labels as labels_lib
from plca_jax.data.sources import base

LAYOUT = """  ROOT/RGB/0000000.png, ...            8-bit RGB images (1280x760)
  ROOT/GT/LABELS/0000000.png, ...      16-bit PNG, class id in channel 1"""


def read_synthia_label(path):
  """Class ids (H, W) from the first channel of a 16-bit SYNTHIA label PNG.

  Decoded with OpenCV: Pillow reads 16-bit RGB PNGs as 8-bit by keeping the
  high byte, which turns every SYNTHIA id (< 256) into 0.
  """
  raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if raw is None:
    raise base.DatasetError(f"cannot read label {path!r} (not a readable "
                            "PNG, or truncated)")
  if raw.ndim == 3:
    raw = raw[..., 2]  # OpenCV is BGR: index 2 is the first (R) channel
  return raw


class Synthia(base.SegmentationSource):
  """SYNTHIA-RAND-CITYSCAPES with labels mapped to the 16-class trainIds."""

  dataset = "SYNTHIA"

  def __init__(self, root, num_classes=16, *, require_labels=True,
               on_error="raise"):
    image_dir = os.path.join(root, "RGB")
    label_dir = os.path.join(root, "GT", "LABELS")
    items = base.find_items(self.dataset, image_dir, label_dir, LAYOUT,
                            require_labels=require_labels)
    super().__init__(root, items, labels_lib.synthia_lut(num_classes),
                     num_classes, on_error)

  def read_label(self, path):
    raw = read_synthia_label(path)
    return raw.astype(np.int64)
