"""Tiny datasets written in exactly the real on-disk formats."""

import os
import struct
import zlib

import numpy as np
from PIL import Image


def write_png16_rgb(path, array):
  """Writes uint16 (H, W, 3) as a 16-bit-per-channel RGB PNG (colour type 2).

  SYNTHIA's label format. Pillow cannot write it, so the PNG is assembled
  here: IHDR, one zlib IDAT of unfiltered big-endian rows, IEND.
  """
  array = np.asarray(array, np.uint16)
  h, w, _ = array.shape
  raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))

  def chunk(kind, data):
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if mode == "P":  # GTA5 labels are palette PNGs: the indices are the ids
    h, w = array.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(array).tobytes())
    image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
  else:
    image = Image.fromarray(array)
  image.save(path)


def random_image(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_synthia(root, ids, rng, *, count=None, size=(6, 8)):
  """SYNTHIA-RAND-CITYSCAPES: RGB/*.png and 16-bit GT/LABELS/*.png.

  `ids` (count, H, W) go into the first label channel; the second channel
  gets instance ids above 255 so a reader that mixes channels or keeps only
  the high byte fails.
  """
  ids = np.asarray(ids) if ids is not None else rng.integers(
      0, 23, (count,) + size)
  for k, label in enumerate(ids):
    name = f"{k:07d}.png"
    _save(os.path.join(root, "RGB", name), random_image(rng, *label.shape))
    channels = np.stack([label, rng.integers(256, 4000, label.shape),
                         np.zeros_like(label)], -1)
    write_png16_rgb(os.path.join(root, "GT", "LABELS", name), channels)
  return ids


def make_cityscapes(root, split, ids, rng, *, cities=("aachen", "bremen"),
                    with_labels=True):
  """leftImg8bit/SPLIT/CITY/*_leftImg8bit.png + gtFine labelIds (mode L)."""
  names = []
  for k, label in enumerate(ids):
    city = cities[k % len(cities)]
    stem = f"{city}_{k:06d}_000019"
    names.append(f"{city}/{stem}")
    _save(os.path.join(root, "leftImg8bit", split, city,
                       stem + "_leftImg8bit.png"),
          random_image(rng, *label.shape))
    if with_labels:
      _save(os.path.join(root, "gtFine", split, city,
                         stem + "_gtFine_labelIds.png"),
            np.asarray(label, np.uint8))
  return names


def make_gta5(root, ids, rng):
  """images/NNNNN.png + labels/NNNNN.png (palette PNGs of labelIds)."""
  for k, label in enumerate(ids):
    name = f"{k + 1:05d}.png"
    _save(os.path.join(root, "images", name), random_image(rng, *label.shape))
    _save(os.path.join(root, "labels", name), np.asarray(label, np.uint8),
          mode="P")
