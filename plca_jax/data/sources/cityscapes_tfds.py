r"""Cityscapes prepared by TensorFlow Datasets, read without TensorFlow.

TFDS's `cityscapes/semantic_segmentation` builder (tensorflow-datasets
4.9.10) turns the manually downloaded `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` into array_record files; `tfds.data_source` reads
them by index (no TensorFlow at read time), so this is a grain source like
the on-disk one, with the same labelId -> trainId mapping and the same
record fields. Its features: `image_id` (e.g. b"frankfurt_000001_000020"),
`image_left` (1024, 2048, 3) uint8 and `segmentation_label` (1024, 2048, 1)
uint8 labelIds; splits "train", "validation" (our "val") and "test".

Prepare once (needs TensorFlow, which requirements.txt installs):

    python -c "import tensorflow_datasets as tfds; \
      tfds.builder('cityscapes/semantic_segmentation', data_dir='D', \
        file_format='array_record').download_and_prepare( \
        download_config=tfds.download.DownloadConfig(manual_dir='M'))"

with the two zips in M; then `--config.data.target.name=cityscapes_tfds
--config.data.target.root=D` (and the same for `data.eval`).
"""

import numpy as np

from plca_jax.data import labels as labels_lib
from plca_jax.data.sources import base

BUILDER = "cityscapes/semantic_segmentation"
SPLITS = {"train": "train", "val": "validation", "test": "test"}


class CityscapesTFDS:
  """Records {"image", "label" (trainIds), "name", "has_label", "skipped"}.

  `name` is "<city>/<image_id>", as the on-disk source names the image
  (predict mode and pseudo-labels use it for paths).
  """

  dataset = "Cityscapes (TFDS)"

  def __init__(self, data_dir, split="train", num_classes=19, *,
               require_labels=True, on_error="raise"):
    del on_error  # array_record records are whole or the build failed
    if split not in SPLITS:
      raise ValueError(f"Cityscapes split={split!r}; expected one of "
                       f"{tuple(SPLITS)}")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      self.source = tfds.data_source(BUILDER, split=SPLITS[split],
                                     data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise base.DatasetError(
          f"{self.dataset}: no prepared {BUILDER!r} split "
          f"{SPLITS[split]!r} under data_dir={data_dir!r} ({e}). Prepare it "
          "as docs/datasets.md says ('Datasets')") from e
    self.root = data_dir
    self.split = split
    self.num_classes = num_classes
    self.lut = labels_lib.cityscapes_lut(num_classes)
    # Test-split labels are placeholders: treat them as absent.
    self.has_labels = split != "test"
    if require_labels and not self.has_labels:
      raise base.DatasetError(f"{self.dataset}: the test split has no "
                              "labels; set require_labels=False")

  def __len__(self):
    return len(self.source)

  def __repr__(self):
    # Stable across runs: grain checks it against restored iterator states.
    return (f"CityscapesTFDS(data_dir={self.root!r}, split={self.split!r}, "
            f"num_classes={self.num_classes}, len={len(self)})")

  def __getitem__(self, index):
    record = self.source[int(index)]
    image_id = record["image_id"]
    image_id = (image_id.decode() if isinstance(image_id, bytes)
                else str(image_id))
    city = image_id.rsplit("_", 2)[0]
    image = np.asarray(record["image_left"], np.uint8)
    if self.has_labels:
      label = self.lut[np.asarray(record["segmentation_label"])[..., 0]]
    else:
      label = np.full(image.shape[:2], labels_lib.IGNORE, np.uint8)
    return {"image": image, "label": label, "name": f"{city}/{image_id}",
            "has_label": self.has_labels, "skipped": np.int32(0)}

  def label(self, index):
    """The trainId label map of item `index` (class-overlap pairing)."""
    return self[index]["label"]
