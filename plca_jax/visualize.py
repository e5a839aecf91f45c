"""Colourised label maps and image rows for `writer.write_images`."""

import numpy as np
from PIL import Image

from plca_jax.data import labels as labels_lib


def _fit(array, height, width, nearest):
  resample = Image.NEAREST if nearest else Image.BILINEAR
  return np.asarray(Image.fromarray(array).resize((width, height), resample))


def prediction_row(image, label, prediction, num_classes, height=128):
  """One (height, 3 * w, 3) uint8 row: input | label | prediction.

  Args:
    image: uint8 (H, W, 3) RGB input (any size).
    label, prediction: (H', W') trainIds (255 = ignore, shown black).
    num_classes: class set of the palette.
    height: output row height; widths follow the label's aspect ratio.
  """
  width = max(1, round(height * label.shape[1] / label.shape[0]))
  panels = [
      _fit(np.asarray(image, np.uint8), height, width, nearest=False),
      _fit(labels_lib.colourize(label, num_classes), height, width, True),
      _fit(labels_lib.colourize(prediction, num_classes), height, width,
           True)]
  return np.concatenate(panels, axis=1)
