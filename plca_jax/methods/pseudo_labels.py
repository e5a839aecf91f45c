"""Pseudo-labels on disk: written by a tool (MBT), read as a batch field.

A pseudo-label directory holds one uint8 PNG of trainIds (255 = ignore) per
target image, at `DIR/<record name>.png` (the name may contain "/", e.g.
Cityscapes' "<city>/<city>_<seq>_<frame>"). Reading adds the field
"pseudo_label" to each record, resized (nearest) to the record's image size
when it was written at another size; the input pipeline then augments it
with the image like the label.
"""

import os

import numpy as np
from PIL import Image

from plca_jax.data import transforms

FIELD = "pseudo_label"


def path_of(directory, name):
  return os.path.join(directory, name + ".png")


def write(directory, name, label):
  """Writes one (H, W) uint8 pseudo-label map."""
  path = path_of(directory, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(label, np.uint8)).save(path)


class WithPseudoLabels:
  """A grain random-access source: `source`'s records + "pseudo_label"."""

  def __init__(self, source, directory):
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"pseudo-label directory {directory!r} does not exist; write it "
          "with `python -m plca_jax.methods.mbt` (docs/methods.md)")
    self.source = source
    self.directory = directory

  def __len__(self):
    return len(self.source)

  def __repr__(self):
    # Stable across runs: grain checks it against restored iterator states.
    return f"WithPseudoLabels({self.source!r}, {self.directory!r})"

  def __getitem__(self, index):
    element = self.source[index]
    path = path_of(self.directory, element["name"])
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"no pseudo-label {path!r} for target image {element['name']!r}; "
          f"{self.directory!r} must hold one PNG per target training image")
    label = np.asarray(Image.open(path))
    if label.ndim != 2:
      raise ValueError(f"pseudo-label {path!r} has shape {label.shape}; "
                       "expected a single-channel (H, W) PNG of trainIds")
    h, w = element["image"].shape[:2]
    if label.shape != (h, w):
      label = transforms.resize_label(label.astype(np.uint8), h, w)
    return {**element, FIELD: label.astype(np.uint8)}


class TargetPseudoLabels:
  """Mixin of a `base.Method` whose config block's `pseudo_label_dir`, when
  set, adds the target's pseudo-labels (`FIELD`) to its batches."""

  def batch_fields(self, domain):
    if domain == "target":
      return ("image",) + ((FIELD,) if self.block.pseudo_label_dir else ())
    return ("image", "label")

  def wrap_source(self, domain, source):
    if domain == "target" and self.block.pseudo_label_dir:
      return WithPseudoLabels(source, self.block.pseudo_label_dir)
    return source

