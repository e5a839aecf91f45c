"""A procedural source/target pair of street-scene domains (no files needed).

Both domains draw the same kind of scene (sky, buildings, vegetation, road,
sidewalk, poles with signs, cars, persons) and label it with Cityscapes
trainIds of the chosen class set, but they differ the way a game engine
differs from a street camera:

| | "source" (synthetic) | "target" (real) |
| --- | --- | --- |
| colour | saturated, game-like palette | shifted, desaturated palette |
| texture | flat regions | facade windows, foliage and asphalt noise |
| light | uniform | vertical gradient and vignette |
| noise / blur | none / none | sensor noise / Gaussian blur |
| layout | horizon lower, fewer cars and persons | horizon higher, busier street |

Item i depends only on (seed, domain, split, i), so every process and
worker renders the same image for the same index, and the "train" and "val"
splits are disjoint sets of scenes. `SyntheticDomain` serves
items through the same interface as the on-disk sources.
"""

import numpy as np
from PIL import Image
from PIL import ImageFilter

from plca_jax.data import labels as labels_lib

DOMAINS = ("source", "target")
SPLITS = ("train", "val")
SCENE_CLASSES = ("road", "sidewalk", "building", "pole", "sign",
                 "vegetation", "sky", "person", "car")

# Base colours (RGB) of each class per domain.
_PALETTES = {
    "source": {
        "road": (110, 60, 150), "sidewalk": (230, 60, 200),
        "building": (90, 90, 110), "pole": (200, 200, 200),
        "sign": (255, 240, 0), "vegetation": (40, 200, 40),
        "sky": (60, 160, 255), "person": (255, 30, 60), "car": (20, 20, 230),
    },
    "target": {
        "road": (95, 95, 100), "sidewalk": (150, 140, 130),
        "building": (140, 110, 90), "pole": (80, 80, 85),
        "sign": (200, 170, 60), "vegetation": (80, 110, 60),
        "sky": (190, 200, 215), "person": (110, 70, 60), "car": (150, 40, 40),
    },
}

_LAYOUT = {  # (horizon range as a fraction of H, cars, persons, poles, trees)
    "source": ((0.40, 0.52), (0, 3), (0, 2), (1, 3), (0, 2)),
    "target": ((0.30, 0.42), (1, 5), (1, 4), (1, 4), (1, 4)),
}


class _Canvas:
  """A label map and an instance colour map painted back to front."""

  def __init__(self, height, width, num_classes, domain, rng):
    self.h, self.w = height, width
    self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
    self.label = np.full((height, width), labels_lib.IGNORE, np.uint8)
    self.rgb = np.zeros((height, width, 3), np.float32)
    self.names = labels_lib.CLASS_NAMES[num_classes]
    self.palette = _PALETTES[domain]
    self.rng = rng

  def paint(self, mask, name, jitter=18.0):
    colour = np.asarray(self.palette[name], np.float32)
    colour = colour + self.rng.normal(0, jitter, 3)  # per-instance variation
    self.label[mask] = self.names.index(name)
    self.rgb[mask] = colour


def _render_layout(canvas, domain, rng):
  """Paints the scene geometry; returns the horizon row."""
  h, w, yy, xx = canvas.h, canvas.w, canvas.yy, canvas.xx
  (hz_lo, hz_hi), cars, persons, poles, trees = _LAYOUT[domain]
  horizon = int(h * rng.uniform(hz_lo, hz_hi))
  canvas.paint(yy < horizon, "sky", 8.0)

  x = 0
  while x < w:  # a row of buildings of random width and height
    bw = int(w * rng.uniform(0.08, 0.25))
    top = int(horizon * rng.uniform(0.1, 0.8))
    canvas.paint((xx >= x) & (xx < x + bw) & (yy >= top) & (yy < horizon + 2),
                 "building")
    x += bw + int(w * rng.uniform(0.0, 0.08))
  for _ in range(rng.integers(*trees, endpoint=True)):
    cx, cy = rng.uniform(0, w), horizon - rng.uniform(0.05, 0.25) * h
    rx, ry = w * rng.uniform(0.04, 0.12), h * rng.uniform(0.06, 0.15)
    canvas.paint(((xx - cx) / rx)**2 + ((yy - cy) / ry)**2 < 1, "vegetation")

  ground = yy >= horizon
  canvas.paint(ground, "sidewalk")
  vx = w * rng.uniform(0.35, 0.65)  # vanishing point of the road
  depth = np.maximum(yy - horizon, 0) / max(h - horizon, 1)  # 0 far, 1 near
  half = (0.02 + rng.uniform(0.45, 0.7) * depth) * w
  canvas.paint(ground & (np.abs(xx - vx) < half), "road", 8.0)

  objects = ([("car", rng.uniform(0.35, 1.0))
              for _ in range(rng.integers(*cars, endpoint=True))] +
             [("person", rng.uniform(0.3, 1.0))
              for _ in range(rng.integers(*persons, endpoint=True))] +
             [("pole", rng.uniform(0.3, 1.0))
              for _ in range(rng.integers(*poles, endpoint=True))])
  objects.sort(key=lambda o: o[1])  # far objects first
  for name, d in objects:
    base = horizon + d * (h - horizon)  # foot row
    scale = 0.15 + 0.85 * d
    road_half = (0.02 + 0.55 * d) * w
    if name == "car":
      cx = vx + rng.uniform(-0.8, 0.8) * road_half
      cw, ch = 0.22 * w * scale, 0.12 * h * scale
      canvas.paint((np.abs(xx - cx) < cw / 2) & (yy < base) &
                   (yy > base - ch), "car")
    elif name == "person":
      side = rng.choice([-1, 1])
      cx = vx + side * (road_half + rng.uniform(0.02, 0.2) * w)
      pw, ph = 0.025 * w * scale, 0.22 * h * scale
      canvas.paint(((xx - cx) / pw)**2 + ((yy - (base - ph / 2)) /
                                          (ph / 2))**2 < 1, "person")
    else:
      side = rng.choice([-1, 1])
      cx = vx + side * (road_half + rng.uniform(0.0, 0.1) * w)
      pw, ph = max(0.008 * w * scale, 1.0), 0.45 * h * scale
      top = base - ph
      canvas.paint((np.abs(xx - cx) < pw) & (yy < base) & (yy > top), "pole")
      sw = 0.04 * w * scale
      canvas.paint((np.abs(xx - cx) < sw) & (yy > top - sw) &
                   (yy < top + 0.5 * sw), "sign")
  return horizon


def _real_style(canvas, horizon, rng):
  """Texture, light, blur and noise of the "real" domain."""
  rgb, label, yy, xx = canvas.rgb, canvas.label, canvas.yy, canvas.xx
  names = canvas.names
  is_cls = lambda n: label == names.index(n)
  # Facade windows, foliage, asphalt grain.
  period = rng.uniform(5, 9)
  windows = ((np.sin(xx * 2 * np.pi / period) > 0.3) &
             (np.sin(yy * 2 * np.pi / (period * 1.4)) > 0.2))
  rgb[is_cls("building") & windows] *= 0.55
  leaf = rng.normal(0, 25, rgb.shape[:2])[..., None]
  rgb[is_cls("vegetation")] += leaf[is_cls("vegetation")]
  grain_ = rng.normal(0, 10, rgb.shape[:2])[..., None]
  rgb[is_cls("road") | is_cls("sidewalk")] += grain_[is_cls("road") |
                                                     is_cls("sidewalk")]
  # Light: brighter sky side, darker ground, vignette.
  light = 1.1 - 0.35 * (yy / canvas.h)
  cx, cy = canvas.w / 2, canvas.h / 2
  vignette = 1 - 0.35 * (((xx - cx) / cx)**2 + ((yy - cy) / cy)**2) / 2
  rgb *= (light * vignette)[..., None] * rng.uniform(0.8, 1.15)
  image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
  image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.4)))
  rgb = np.asarray(image, np.float32) + rng.normal(0, 7, rgb.shape)
  del horizon
  return rgb


def render(domain, index, *, seed=0, split="train", height=128, width=256,
           num_classes=16):
  """Renders item `index` of `domain` (and `split`).

  Returns:
    (image uint8 (height, width, 3) RGB, label uint8 (height, width)).
  """
  if domain not in DOMAINS:
    raise ValueError(f"domain={domain!r}; expected one of {DOMAINS}")
  if split not in SPLITS:
    raise ValueError(f"synthetic split={split!r}; expected one of {SPLITS}")
  rng = np.random.default_rng([seed, DOMAINS.index(domain),
                               SPLITS.index(split), index])
  canvas = _Canvas(height, width, num_classes, domain, rng)
  horizon = _render_layout(canvas, domain, rng)
  rgb = canvas.rgb
  if domain == "target":
    rgb = _real_style(canvas, horizon, rng)
  return np.clip(rgb, 0, 255).astype(np.uint8), canvas.label


class SyntheticDomain:
  """`num_images` rendered scenes of one domain, as a grain data source."""

  dataset = "synthetic"

  def __init__(self, domain, num_images, *, split="train", height=128,
               width=256, num_classes=16, seed=0, with_labels=True):
    if domain not in DOMAINS:
      raise ValueError(f"domain={domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
      raise ValueError(f"synthetic split={split!r}; expected one of {SPLITS}")
    labels_lib.palette(num_classes)  # validates num_classes
    self.domain = domain
    self.split = split
    self.num_images = num_images
    self.height, self.width = height, width
    self.num_classes = num_classes
    self.seed = seed
    self.with_labels = with_labels

  def __len__(self):
    return self.num_images

  def __repr__(self):
    return (f"SyntheticDomain(domain={self.domain!r}, split={self.split!r}, "
            f"num_images={self.num_images}, size={self.height}x{self.width}, "
            f"num_classes={self.num_classes}, seed={self.seed})")

  def label(self, index):
    """The label map of item `index` (IGNORE without labels)."""
    return self[index]["label"]

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.num_images:
      raise IndexError(f"index {index} out of range for {self!r}")
    image, label = render(self.domain, index, seed=self.seed,
                          split=self.split, height=self.height,
                          width=self.width,
                          num_classes=self.num_classes)
    if not self.with_labels:
      label = np.full_like(label, labels_lib.IGNORE)
    return {"image": image, "label": label,
            "name": f"{self.domain}_{self.split}_{index:06d}",
            "has_label": self.with_labels, "skipped": np.int32(0)}
