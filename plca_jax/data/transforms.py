"""grain transforms of SPEC.md sections 4 and 5, one job per class.

Elements are dicts with "image" uint8 (H, W, 3) RGB and "label" uint8 (H, W).
Resizing uses Pillow like the authors' release (torchvision on PIL images):
bilinear for images (antialiased when shrinking), nearest for labels.
Randomness comes only from the `rng` grain passes to `random_map`.
"""

import dataclasses

import grain
import numpy as np
from PIL import Image

from plca_jax.data import labels as labels_lib

# The release's default pixel encoding: BGR, 0-255, minus this mean.
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODINGS = ("bgr_mean", "rgb_imagenet")


def resize_image(image, height, width):
  """Bilinear (Pillow) resize of a uint8 (H, W, 3) image."""
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  Image.BILINEAR))


def resize_label(label, height, width):
  """Nearest (Pillow) resize of a uint8 (H, W) label map."""
  return np.asarray(Image.fromarray(label).resize((width, height),
                                                  Image.NEAREST))


def shorter_edge_size(height, width, size):
  """(h, w) with the shorter edge `size`, like torchvision's F.resize(int)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


@dataclasses.dataclass(frozen=True)
class RandomResizeShorter(grain.transforms.RandomMap):
  """Resizes so the shorter edge is a random integer in [min_size, max_size]."""
  min_size: int
  max_size: int

  def random_map(self, element, rng):
    size = int(rng.integers(self.min_size, self.max_size + 1))
    h, w = shorter_edge_size(*element["label"].shape, size)
    return {**element, "image": resize_image(element["image"], h, w),
            "label": resize_label(element["label"], h, w)}


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors image and label together with probability `prob`."""
  prob: float = 0.5

  def random_map(self, element, rng):
    if rng.random() >= self.prob:
      return element
    return {**element, "image": element["image"][:, ::-1],
            "label": element["label"][:, ::-1]}


@dataclasses.dataclass(frozen=True)
class RandomCropPad(grain.transforms.RandomMap):
  """Random (height, width) crop; pads bottom/right first if smaller.

  Padding is 0 for the image and IGNORE for the label, as in the release.
  """
  height: int
  width: int

  def random_map(self, element, rng):
    image, label = element["image"], element["label"]
    h, w = label.shape
    ph, pw = max(self.height - h, 0), max(self.width - w, 0)
    if ph or pw:
      image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
      label = np.pad(label, ((0, ph), (0, pw)),
                     constant_values=labels_lib.IGNORE)
      h, w = label.shape
    top = int(rng.integers(0, h - self.height + 1))
    left = int(rng.integers(0, w - self.width + 1))
    return {**element,
            "image": image[top:top + self.height, left:left + self.width],
            "label": label[top:top + self.height, left:left + self.width]}


@dataclasses.dataclass(frozen=True)
class ResizeImage(grain.transforms.Map):
  """Resizes the image only (evaluation: labels stay at full resolution)."""
  height: int
  width: int

  def map(self, element):
    return {**element,
            "image": resize_image(element["image"], self.height, self.width)}


def encode(image, encoding="bgr_mean"):
  """uint8 RGB (..., 3) -> float32 network input; NumPy or jax arrays.

  "bgr_mean": BGR channel order, 0-255, minus BGR_MEAN (the release's
  default); "rgb_imagenet": RGB in [0, 1], minus ImageNet mean, over std.
  The pipelines deliver uint8 and the jitted steps call this on the device
  (4x less host-to-device traffic; faster pipeline, see README).
  """
  image = image.astype(np.float32)
  if encoding == "bgr_mean":
    return image[..., ::-1] - np.asarray(BGR_MEAN, np.float32)
  if encoding == "rgb_imagenet":
    return ((image / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) /
            np.asarray(IMAGENET_STD, np.float32))
  raise ValueError(f"encoding={encoding!r}; expected one of {ENCODINGS}")
