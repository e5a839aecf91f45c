"""The one table of classes: names, id -> trainId maps, class sets, palette.

Class order is the standard Cityscapes trainId order (docs/method.md, Data).
Three class sets are used:
- 19 classes (GTA5 -> Cityscapes);
- 16 classes (SYNTHIA -> Cityscapes): the 19 without terrain, truck, train;
- 13 classes (mIoU*): the 16 without wall, fence, pole.
Every id not listed maps to IGNORE (255).
"""

import numpy as np

IGNORE = 255

# (name, Cityscapes labelId, colour) in trainId order.
CITYSCAPES_19 = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("light", 19, (250, 170, 30)),
    ("sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)

CLASS_NAMES = {
    19: tuple(name for name, _, _ in CITYSCAPES_19),
    16: tuple(name for name, _, _ in CITYSCAPES_19
              if name not in ("terrain", "truck", "train")),
}
CLASS_NAMES[13] = tuple(name for name in CLASS_NAMES[16]
                        if name not in ("wall", "fence", "pole"))

# Indices of the 13 mIoU* classes within the 16-class set.
MIOU13_INDICES = tuple(CLASS_NAMES[16].index(n) for n in CLASS_NAMES[13])

_COLOURS = {name: colour for name, _, colour in CITYSCAPES_19}

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS/*.png).
SYNTHIA_IDS = {
    "sky": 1, "building": 2, "road": 3, "sidewalk": 4, "fence": 5,
    "vegetation": 6, "pole": 7, "car": 8, "sign": 9, "person": 10,
    "bicycle": 11, "motorcycle": 12, "light": 15, "rider": 17, "bus": 19,
    "wall": 21,
}


def _check_num_classes(num_classes, allowed=(16, 19)):
  if num_classes not in allowed:
    raise ValueError(f"num_classes={num_classes}; expected one of {allowed}")


def palette(num_classes):
  """(num_classes, 3) uint8 Cityscapes colours of the class set."""
  _check_num_classes(num_classes, (13, 16, 19))
  return np.array([_COLOURS[n] for n in CLASS_NAMES[num_classes]], np.uint8)


def _lookup(pairs, size):
  table = np.full((size,), IGNORE, np.uint8)
  for src, dst in pairs:
    table[src] = dst
  return table


def cityscapes_lut(num_classes):
  """256-entry uint8 table: Cityscapes labelId -> trainId of the class set.

  Also serves GTA5, whose labels are Cityscapes labelIds.
  """
  _check_num_classes(num_classes)
  names = CLASS_NAMES[num_classes]
  return _lookup([(label_id, names.index(name))
                  for name, label_id, _ in CITYSCAPES_19 if name in names],
                 256)


def synthia_lut(num_classes=16):
  """65536-entry uint8 table: SYNTHIA class id -> trainId (16 classes).

  SYNTHIA's 16-bit label values index it directly.
  """
  _check_num_classes(num_classes, (16,))
  names = CLASS_NAMES[16]
  return _lookup([(sid, names.index(name))
                  for name, sid in SYNTHIA_IDS.items()], 65536)


def colourize(label, num_classes):
  """(H, W) trainIds -> (H, W, 3) uint8 colours; IGNORE is black."""
  colours = np.zeros((256, 3), np.uint8)
  colours[:num_classes] = palette(num_classes)
  return colours[np.asarray(label, np.uint8)]


def train_to_label_ids(num_classes):
  """(num_classes,) uint8: trainId of the class set -> Cityscapes labelId
  (what cityscapesScripts' evaluation and benchmark server read)."""
  _check_num_classes(num_classes)
  ids = {name: label_id for name, label_id, _ in CITYSCAPES_19}
  return np.array([ids[n] for n in CLASS_NAMES[num_classes]], np.uint8)
