"""The TFDS-prepared Cityscapes source, against the on-disk one.

The test prepares a tiny dataset with TFDS's own `cityscapes/semantic_
segmentation` builder from zips in the real layout (the builder fixes
images at 1024x2048), exactly as a user prepares the real one.
"""

import io
import os
import tempfile
import zipfile

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest

from configs import default as default_config
from configs import test as test_config
from plca_jax.data import input_pipeline
from plca_jax.data.sources import base
from plca_jax.data.sources import cityscapes
from plca_jax.data.sources import cityscapes_tfds

CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau"),
          "test": ("berlin", "bonn")}


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _write(manual, disk, rng):
  """The two Cityscapes zips in `manual` and the same files under `disk`."""
  os.makedirs(manual)
  with zipfile.ZipFile(os.path.join(manual, "leftImg8bit_trainvaltest.zip"),
                       "w") as images, zipfile.ZipFile(
                           os.path.join(manual, "gtFine_trainvaltest.zip"),
                           "w") as labels:
    for split, cities in CITIES.items():
      for k, city in enumerate(cities):
        stem = f"{city}_{k:06d}_000019"
        # Blocky content (compresses well at full size).
        coarse = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)
        image = np.repeat(np.repeat(coarse, 128, 0), 128, 1)
        ids = np.repeat(np.repeat(rng.choice(
            [0, 7, 8, 11, 21, 23, 24, 26, 33], (8, 16)), 128, 0), 128, 1)
        ids = ids.astype(np.uint8)
        files = {
            f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png":
                (images, image),
            f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png":
                (labels, ids)}
        for name, (archive, array) in files.items():
          data = _png(array)
          archive.writestr(name, data)
          path = os.path.join(disk, name)
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with open(path, "wb") as f:
            f.write(data)


@pytest.mark.slow
class CityscapesTFDSTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    cls.tmp = tempfile.mkdtemp()
    manual = os.path.join(cls.tmp, "manual")
    cls.disk = os.path.join(cls.tmp, "cityscapes")
    cls.data_dir = os.path.join(cls.tmp, "tfds")
    _write(manual, cls.disk, np.random.default_rng(0))
    tfds.builder(cityscapes_tfds.BUILDER, data_dir=cls.data_dir,
                 file_format="array_record").download_and_prepare(
                     download_config=tfds.download.DownloadConfig(
                         manual_dir=manual))

  def test_records_equal_the_on_disk_source(self):
    for split in ("train", "val"):
      for num_classes in (19, 16):
        ours = cityscapes_tfds.CityscapesTFDS(self.data_dir, split,
                                              num_classes)
        disk = cityscapes.Cityscapes(self.disk, split, num_classes)
        self.assertLen(ours, len(disk))
        by_name = {disk[i]["name"]: disk[i] for i in range(len(disk))}
        for i in range(len(ours)):
          record = ours[i]
          want = by_name[record["name"]]
          np.testing.assert_array_equal(record["image"], want["image"])
          np.testing.assert_array_equal(record["label"], want["label"])
          self.assertTrue(record["has_label"])
    test = cityscapes_tfds.CityscapesTFDS(self.data_dir, "test", 19,
                                          require_labels=False)
    self.assertTrue(np.all(test[0]["label"] == 255))
    self.assertFalse(test[0]["has_label"])
    with self.assertRaisesRegex(base.DatasetError, "no labels"):
      cityscapes_tfds.CityscapesTFDS(self.data_dir, "test", 19)
    with self.assertRaisesRegex(base.DatasetError,
                                "nowhere.*docs/datasets.md"):
      cityscapes_tfds.CityscapesTFDS(os.path.join(self.tmp, "nowhere"),
                                     "val", 19)

  def test_training_and_evaluation_read_it(self):
    config = test_config.get_config()
    config.model.num_classes = 19
    config.data.target = default_config.domain(
        "cityscapes_tfds", root=self.data_dir, require_labels=False)
    config.data.eval = default_config.domain(
        "cityscapes_tfds", root=self.data_dir, split="val")
    config.data.eval_image_size = (32, 64)
    config.data.eval_label_size = (1024, 2048)
    batch = next(input_pipeline.create_train_iterator(config))
    self.assertEqual(batch["target"]["image"].shape, (2, 32, 32, 3))
    it, total = input_pipeline.create_eval_iterator(config)
    self.assertEqual(total, 2)
    element = next(it)
    self.assertEqual(element["image"].shape, (2, 32, 64, 3))
    self.assertEqual(element["label"].shape, (2, 1024, 2048))


if __name__ == "__main__":
  absltest.main()
