"""Random-access segmentation sources over image/label files (grain sources).

A source is a list of (name, image path, label path) triples, checked when it
is built, and decodes one pair per `__getitem__`:
`{"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) trainIds (255 =
ignore), "name": str, "has_label": bool, "skipped": int32}`.

Bad files: `on_error="raise"` raises `DatasetError` naming the file;
`on_error="skip"` logs it and serves the next readable item instead, and the
element's "skipped" counts how many files were passed over for it (the
training loop sums these into its metrics).
"""

import os
from typing import NamedTuple, Optional

from absl import logging
import numpy as np
from PIL import Image

from plca_jax.data import labels as labels_lib

ON_ERROR = ("raise", "skip")
MAX_LISTED = 10  # names quoted in an error before "... and N more"


class DatasetError(ValueError):
  """A dataset on disk is missing, malformed or does not pair up."""


class Item(NamedTuple):
  name: str
  image: str
  label: Optional[str]


def require_dir(path, dataset, layout):
  """Raises DatasetError naming `path` and the expected layout if absent."""
  if not os.path.isdir(path):
    raise DatasetError(f"{dataset}: directory {path!r} does not exist. "
                       f"Expected layout:\n{layout}")


def list_files(directory, suffix):
  """Sorted paths relative to `directory` of files ending in `suffix`."""
  found = []
  for dirpath, _, filenames in os.walk(directory):
    for f in filenames:
      if f.endswith(suffix):
        found.append(os.path.relpath(os.path.join(dirpath, f), directory))
  return sorted(found)


def _quote(names):
  names = sorted(names)
  text = ", ".join(names[:MAX_LISTED])
  if len(names) > MAX_LISTED:
    text += f" ... and {len(names) - MAX_LISTED} more"
  return text


def pair_up(dataset, images, labels, where):
  """Matches {key: path} dicts of images and labels; errors list the misfits.

  Args:
    dataset: name for messages.
    images, labels: dicts from a shared key (the item name) to a path;
      `labels` None when the source has no labels.
    where: the directories, for messages.

  Returns:
    list of Item sorted by name.
  """
  if not images:
    raise DatasetError(f"{dataset}: no images found in {where}")
  if labels is not None:
    no_label = set(images) - set(labels)
    no_image = set(labels) - set(images)
    if no_label or no_image:
      msg = [f"{dataset}: images and labels in {where} do not pair up."]
      if no_label:
        msg.append(f"{len(no_label)} image(s) without a label: "
                   f"{_quote(no_label)}")
      if no_image:
        msg.append(f"{len(no_image)} label(s) without an image: "
                   f"{_quote(no_image)}")
      raise DatasetError("\n".join(msg))
  return [Item(k, images[k], None if labels is None else labels[k])
          for k in sorted(images)]


def find_items(dataset, image_dir, label_dir, layout, *, image_suffix=".png",
               label_suffix=".png", require_labels=True):
  """Lists and pairs the images and labels of a dataset split.

  Items are keyed by the file path relative to its directory, minus the
  suffix. Labels are read when `require_labels` or when `label_dir` exists.

  Returns:
    list of Item sorted by name.
  """
  require_dir(image_dir, dataset, layout)

  def keyed(directory, suffix):
    return {f[:-len(suffix)]: os.path.join(directory, f)
            for f in list_files(directory, suffix)}

  labels = None
  if require_labels or os.path.isdir(label_dir):
    require_dir(label_dir, dataset, layout)
    labels = keyed(label_dir, label_suffix)
  return pair_up(dataset, keyed(image_dir, image_suffix), labels,
                 f"{image_dir} and {label_dir}")


def read_rgb(path):
  """uint8 (H, W, 3) RGB of an image file; DatasetError naming it if bad."""
  try:
    with Image.open(path) as im:
      im.load()  # decode now, so that truncated files fail here
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:
    raise DatasetError(f"cannot read image {path!r}: {e}") from e


def read_index_png(path):
  """uint8 (H, W) of a single-channel (L or P mode) label PNG."""
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode not in ("L", "P"):
        raise DatasetError(
            f"label {path!r} has mode {im.mode}; expected a single-channel "
            "id image (mode L or P), e.g. *_gtFine_labelIds.png, not a "
            "colour label")
      return np.asarray(im)
  except (OSError, ValueError, SyntaxError) as e:
    if isinstance(e, DatasetError):
      raise
    raise DatasetError(f"cannot read label {path!r}: {e}") from e


class SegmentationSource:
  """Base class: subclasses list items and set `lut` and `read_label`."""

  dataset = "dataset"

  def __init__(self, root, items, lut, num_classes, on_error="raise"):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
    self.root = root
    self.items = items
    self.lut = lut
    self.num_classes = num_classes
    self.on_error = on_error

  def read_label(self, path):
    """Raw label ids (H, W) of one file; overridden for 16-bit formats."""
    return read_index_png(path)

  def __len__(self):
    return len(self.items)

  def __repr__(self):
    # Stable across runs: grain checks it against restored iterator states.
    return (f"{type(self).__name__}(root={self.root!r}, "
            f"num_classes={self.num_classes}, len={len(self)})")

  def label(self, index):
    """The trainId label map (H, W) of item `index`, without its image
    (IGNORE everywhere when the item has no label file)."""
    item = self.items[int(index)]
    if item.label is None:
      return np.full(read_rgb(item.image).shape[:2], labels_lib.IGNORE,
                     np.uint8)
    return self.lut[self.read_label(item.label)]

  def _read(self, index):
    item = self.items[index]
    image = read_rgb(item.image)
    if item.label is None:
      label = np.full(image.shape[:2], labels_lib.IGNORE, np.uint8)
    else:
      raw = self.read_label(item.label)
      if raw.shape != image.shape[:2]:
        raise DatasetError(
            f"{self.dataset} item {item.name!r}: image {item.image!r} is "
            f"{image.shape[1]}x{image.shape[0]} but label {item.label!r} is "
            f"{raw.shape[1]}x{raw.shape[0]} (W x H)")
      label = self.lut[raw]
    return {"image": image, "label": label, "name": item.name,
            "has_label": item.label is not None}

  def __getitem__(self, index):
    index = int(index)
    if self.on_error == "raise":
      element = self._read(index)
      element["skipped"] = np.int32(0)
      return element
    for skipped in range(len(self)):
      try:
        element = self._read((index + skipped) % len(self))
      except DatasetError as e:
        logging.warning("%s: skipping unreadable item: %s", self.dataset, e)
        continue
      element["skipped"] = np.int32(skipped)
      return element
    raise DatasetError(f"{self.dataset} at {self.root!r}: no item is "
                       "readable")
