"""grain transforms of docs/method.md, Data and Evaluation, one job per class.

Elements are dicts with "image" uint8 (H, W, 3) RGB and "label" uint8 (H, W).
Every other 2-D array field whose name ends in "label" (e.g. a method's
"pseudo_label") is a label map of the image's size and goes through the same
geometric transforms as "label" (nearest resize, flip, crop with IGNORE
padding). Resizing uses Pillow like the authors' release (torchvision on PIL images):
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


def label_keys(element):
  """The label-map fields: "label" and any other 2-D "*label" array."""
  return [k for k, v in element.items()
          if k.endswith("label") and getattr(v, "ndim", 0) == 2]


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
    out = {**element, "image": resize_image(element["image"], h, w)}
    for key in label_keys(element):
      out[key] = resize_label(element[key], h, w)
    return out


@dataclasses.dataclass(frozen=True)
class RandomHorizontalFlip(grain.transforms.RandomMap):
  """Mirrors image and label together with probability `prob`."""
  prob: float = 0.5

  def random_map(self, element, rng):
    if rng.random() >= self.prob:
      return element
    out = {**element, "image": element["image"][:, ::-1]}
    for key in label_keys(element):
      out[key] = element[key][:, ::-1]
    return out


@dataclasses.dataclass(frozen=True)
class RandomCropPad(grain.transforms.RandomMap):
  """Random (height, width) crop; pads bottom/right first if smaller.

  Padding is 0 for the image and IGNORE for the label, as in the release.
  """
  height: int
  width: int

  def random_map(self, element, rng):
    keys = label_keys(element)
    maps = {"image": element["image"], **{k: element[k] for k in keys}}
    h, w = element["label"].shape
    ph, pw = max(self.height - h, 0), max(self.width - w, 0)
    if ph or pw:
      maps["image"] = np.pad(maps["image"], ((0, ph), (0, pw), (0, 0)))
      for k in keys:
        maps[k] = np.pad(maps[k], ((0, ph), (0, pw)),
                         constant_values=labels_lib.IGNORE)
      h, w = maps["label"].shape
    top = int(rng.integers(0, h - self.height + 1))
    left = int(rng.integers(0, w - self.width + 1))
    return {**element, **{k: v[top:top + self.height, left:left + self.width]
                          for k, v in maps.items()}}


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
  (4x less host-to-device traffic; faster pipeline, see docs/datasets.md).
  """
  image = image.astype(np.float32)
  if encoding == "bgr_mean":
    return image[..., ::-1] - np.asarray(BGR_MEAN, np.float32)
  if encoding == "rgb_imagenet":
    return ((image / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) /
            np.asarray(IMAGENET_STD, np.float32))
  raise ValueError(f"encoding={encoding!r}; expected one of {ENCODINGS}")


# ITU-R 601 luma weights (as Pillow's convert("L")).
LUMA = (0.299, 0.587, 0.114)


def grayscale(image):
  """RGB (..., 3) -> its luma replicated on 3 channels (float32); NumPy or
  jax arrays."""
  image = image.astype(np.float32)
  luma = (image[..., 0] * LUMA[0] + image[..., 1] * LUMA[1] +
          image[..., 2] * LUMA[2])
  return luma[..., None] * np.ones((3,), np.float32)


def network_input(image, data_config):
  """uint8 RGB -> the network's input under `config.data`: grayscale first
  when `data_config.grayscale` (pixel_contrast's stage 1), then `encode`."""
  if data_config.get("grayscale", False):
    image = grayscale(image)
  return encode(image, data_config.encoding)

