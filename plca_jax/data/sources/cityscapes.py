"""Cityscapes leftImg8bit + gtFine labelIds (docs/method.md, Data)."""

import os

from plca_jax.data import labels as labels_lib
from plca_jax.data.sources import base

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")
LAYOUT = """  ROOT/leftImg8bit/SPLIT/CITY/CITY_xxxxxx_yyyyyy_leftImg8bit.png
  ROOT/gtFine/SPLIT/CITY/CITY_xxxxxx_yyyyyy_gtFine_labelIds.png
  (SPLIT in train, val, test; the labels are optional for a target stream)"""


class Cityscapes(base.SegmentationSource):
  """Cityscapes images with labelIds mapped to 19 or 16 trainIds."""

  dataset = "Cityscapes"

  def __init__(self, root, split="train", num_classes=19, *,
               require_labels=True, on_error="raise"):
    if split not in SPLITS:
      raise ValueError(f"Cityscapes split={split!r}; expected one of "
                       f"{SPLITS}")
    image_dir = os.path.join(root, "leftImg8bit", split)
    label_dir = os.path.join(root, "gtFine", split)
    items = base.find_items(
        self.dataset, image_dir, label_dir, LAYOUT, image_suffix=IMAGE_SUFFIX,
        label_suffix=LABEL_SUFFIX, require_labels=require_labels)
    super().__init__(root, items, labels_lib.cityscapes_lut(num_classes),
                     num_classes, on_error)
    self.split = split

  def __repr__(self):
    return (f"Cityscapes(root={self.root!r}, split={self.split!r}, "
            f"num_classes={self.num_classes}, len={len(self)})")
