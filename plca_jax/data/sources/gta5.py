"""GTA5 (Playing for Data): images/ and labels/ with Cityscapes labelIds."""

import os

from plca_jax.data import labels as labels_lib
from plca_jax.data.sources import base

LAYOUT = """  ROOT/images/00001.png, ...    RGB images (1914x1052)
  ROOT/labels/00001.png, ...    labels, Cityscapes labelIds (mode P or L)"""


class GTA5(base.SegmentationSource):
  """GTA5 with labels mapped to 19 (or 16) Cityscapes trainIds."""

  dataset = "GTA5"

  def __init__(self, root, num_classes=19, *, require_labels=True,
               on_error="raise"):
    image_dir = os.path.join(root, "images")
    label_dir = os.path.join(root, "labels")
    items = base.find_items(self.dataset, image_dir, label_dir, LAYOUT,
                            require_labels=require_labels)
    super().__init__(root, items, labels_lib.cityscapes_lut(num_classes),
                     num_classes, on_error)
