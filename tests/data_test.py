"""Tests of the data sources, transforms and grain pipelines."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np
import pytest

from configs import default as default_config
from plca_jax.data import input_pipeline
from plca_jax.data import labels
from plca_jax.data import synthetic
from plca_jax.data import transforms
from plca_jax.data.sources import base
from plca_jax.data.sources import cityscapes
from plca_jax.data.sources import gta5
from plca_jax.data.sources import synthia
from tests import fixtures

# Independent copies of docs/method.md, Data's tables (not imported from
# plca_jax.data.labels, so that a wrong table there fails here).
SYNTHIA_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
                 1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15}
CITYSCAPES_TO_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                    21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
                    28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_TO_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                    21: 8, 23: 9, 24: 10, 25: 11, 26: 12, 28: 13, 32: 14,
                    33: 15}


def _expected(ids, table):
  out = np.full(ids.shape, 255, np.uint8)
  for src, dst in table.items():
    out[ids == src] = dst
  return out


def _synthetic_config(num_source=10, num_target=7, workers=0):
  config = default_config.get_config()
  config.seed = 3
  config.data.source = default_config.domain(
      "synthetic", synthetic_domain="source", num_images=num_source)
  config.data.target = default_config.domain(
      "synthetic", synthetic_domain="target", num_images=num_target,
      require_labels=False)
  config.data.eval = default_config.domain(
      "synthetic", split="val", synthetic_domain="target",
      num_images=num_target)
  config.data.synthetic_height, config.data.synthetic_width = 24, 40
  config.data.resize_min, config.data.resize_max = 24, 30
  config.data.crop_size = (20, 28)
  config.data.eval_image_size = (16, 24)
  config.data.eval_label_size = (24, 40)
  config.data.num_workers = workers
  config.train.batch_size = 2
  config.eval.batch_size = 2
  return config


class SourcesTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.create_tempdir().full_path
    self.rng = np.random.default_rng(0)

  def test_sources_are_exported_from_plca_jax_data(self):
    import plca_jax.data  # pylint: disable=g-import-not-at-top
    self.assertIs(plca_jax.data.Synthia, synthia.Synthia)
    self.assertIs(plca_jax.data.Cityscapes, cityscapes.Cityscapes)
    self.assertIs(plca_jax.data.GTA5, gta5.GTA5)

  def test_synthia_16bit_labels_map_pixel_by_pixel(self):
    ids = np.arange(0, 24 * 2).reshape(2, 4, 6) % 24
    ids[1, 0, 0] = 300  # 16-bit value: not a class
    fixtures.make_synthia(self.root, ids, self.rng)
    source = synthia.Synthia(self.root)
    self.assertLen(source, 2)
    for k in range(2):
      element = source[k]
      np.testing.assert_array_equal(element["label"],
                                    _expected(ids[k], SYNTHIA_TO_16))
      self.assertEqual(element["image"].dtype, np.uint8)
      self.assertEqual(element["image"].shape, (4, 6, 3))
      self.assertEqual(element["name"], f"{k:07d}")

  @parameterized.parameters((19, CITYSCAPES_TO_19), (16, CITYSCAPES_TO_16))
  def test_cityscapes_label_ids_map_pixel_by_pixel(self, num_classes, table):
    ids = np.arange(0, 36).reshape(1, 6, 6).repeat(3, 0)
    ids[2] = 255 - ids[2]  # ids that are no class at all
    names = fixtures.make_cityscapes(self.root, "val", ids, self.rng)
    source = cityscapes.Cityscapes(self.root, "val", num_classes)
    self.assertEqual([source[k]["name"] for k in range(3)], sorted(names))
    by_name = dict(zip(names, ids))
    for k in range(3):
      element = source[k]
      np.testing.assert_array_equal(
          element["label"], _expected(by_name[element["name"]], table))

  def test_gta5_palette_labels(self):
    ids = self.rng.integers(0, 35, (2, 5, 7))
    fixtures.make_gta5(self.root, ids, self.rng)
    source = gta5.GTA5(self.root)
    for k in range(2):
      np.testing.assert_array_equal(source[k]["label"],
                                    _expected(ids[k], CITYSCAPES_TO_19))

  def test_image_pixels_are_read_as_rgb(self):
    ids = np.zeros((1, 3, 4), int)
    fixtures.make_gta5(self.root, ids, self.rng)
    expected = fixtures.random_image(np.random.default_rng(0), 3, 4)
    np.testing.assert_array_equal(gta5.GTA5(self.root)[0]["image"], expected)

  def test_target_without_labels(self):
    ids = np.full((2, 4, 4), 7)
    fixtures.make_cityscapes(self.root, "train", ids, self.rng,
                             with_labels=False)
    with self.assertRaisesRegex(base.DatasetError, "gtFine"):
      cityscapes.Cityscapes(self.root, "train")
    source = cityscapes.Cityscapes(self.root, "train", require_labels=False)
    element = source[0]
    self.assertFalse(element["has_label"])
    np.testing.assert_array_equal(element["label"], 255)

  def test_missing_root_or_split_names_path_and_layout(self):
    with self.assertRaisesRegex(base.DatasetError,
                                r"(?s)nowhere/RGB.*GT/LABELS"):
      synthia.Synthia(os.path.join(self.root, "nowhere"))
    fixtures.make_cityscapes(self.root, "train", np.zeros((1, 2, 2)),
                             self.rng)
    with self.assertRaisesRegex(base.DatasetError,
                                r"(?s)leftImg8bit/val.*Expected layout"):
      cityscapes.Cityscapes(self.root, "val")
    with self.assertRaisesRegex(ValueError, "split='trainval'"):
      cityscapes.Cityscapes(self.root, "trainval")

  def test_unpaired_files_are_listed_by_name(self):
    fixtures.make_gta5(self.root, np.zeros((3, 2, 2)), self.rng)
    os.remove(os.path.join(self.root, "labels", "00002.png"))
    os.rename(os.path.join(self.root, "images", "00003.png"),
              os.path.join(self.root, "images", "00009.png"))
    with self.assertRaisesRegex(
        base.DatasetError,
        r"(?s)2 image\(s\) without a label: 00002, 00009.*"
        r"1 label\(s\) without an image: 00003"):
      gta5.GTA5(self.root)

  def test_size_mismatch_names_both_files(self):
    fixtures.make_gta5(self.root, np.zeros((1, 4, 4)), self.rng)
    fixtures.make_gta5(self.create_tempdir().full_path, np.zeros((1, 4, 4)),
                       self.rng)
    fixtures._save(os.path.join(self.root, "labels", "00001.png"),
                   np.zeros((3, 4), np.uint8), mode="P")
    with self.assertRaisesRegex(base.DatasetError,
                                r"image .*00001.png.* is 4x4 but label"):
      gta5.GTA5(self.root)[0]

  def test_truncated_image_raise_or_skip(self):
    fixtures.make_synthia(self.root, None, self.rng, count=3)
    bad = os.path.join(self.root, "RGB", "0000001.png")
    with open(bad, "rb") as f:
      data = f.read()
    with open(bad, "wb") as f:
      f.write(data[:len(data) // 2])
    with self.assertRaisesRegex(base.DatasetError, "0000001.png"):
      synthia.Synthia(self.root)[1]
    source = synthia.Synthia(self.root, on_error="skip")
    element = source[1]
    self.assertEqual(element["name"], "0000002")
    self.assertEqual(int(element["skipped"]), 1)
    self.assertEqual(int(source[0]["skipped"]), 0)

  def test_colour_label_is_rejected(self):
    fixtures.make_gta5(self.root, np.zeros((1, 4, 4)), self.rng)
    fixtures._save(os.path.join(self.root, "labels", "00001.png"),
                   np.zeros((4, 4, 3), np.uint8))
    with self.assertRaisesRegex(base.DatasetError, "mode RGB"):
      gta5.GTA5(self.root)[0]


class LabelsTest(absltest.TestCase):

  def test_class_sets(self):
    self.assertLen(labels.CLASS_NAMES[19], 19)
    self.assertLen(labels.CLASS_NAMES[16], 16)
    self.assertEqual([labels.CLASS_NAMES[16][i]
                      for i in labels.MIOU13_INDICES],
                     list(labels.CLASS_NAMES[13]))
    self.assertNotIn("wall", labels.CLASS_NAMES[13])
    self.assertEqual(labels.palette(19)[0].tolist(), [128, 64, 128])
    self.assertEqual(labels.palette(16)[9].tolist(), [70, 130, 180])  # sky


class TransformsTest(parameterized.TestCase):

  def _element(self, rng, h=11, w=17):
    label = rng.integers(0, 19, (h, w)).astype(np.uint8)
    image = np.stack([label * 10, rng.integers(0, 256, (h, w)),
                      np.full((h, w), 7)], -1).astype(np.uint8)
    return {"image": image, "label": label, "name": "x"}

  @parameterized.parameters((8, 9), (11, 17), (15, 20))
  def test_flip_and_crop_keep_image_and_label_aligned(self, ch, cw):
    for seed in range(10):
      rng = np.random.default_rng(seed)
      element = self._element(rng)
      element = transforms.RandomHorizontalFlip(0.5).random_map(element, rng)
      element = transforms.RandomCropPad(ch, cw).random_map(element, rng)
      image, label = element["image"], element["label"]
      self.assertEqual(image.shape, (ch, cw, 3))
      self.assertEqual(label.shape, (ch, cw))
      real = image[..., 2] == 7
      np.testing.assert_array_equal(image[..., 0][real], label[real] * 10)
      np.testing.assert_array_equal(label[~real], 255)  # padding
      np.testing.assert_array_equal(image[~real], 0)
      if ch > 11 or cw > 17:
        self.assertTrue(np.any(~real))

  def test_flip_mirrors(self):
    rng = np.random.default_rng(0)
    element = self._element(rng)
    flipped = transforms.RandomHorizontalFlip(1.0).random_map(element, rng)
    np.testing.assert_array_equal(flipped["label"], element["label"][:, ::-1])
    same = transforms.RandomHorizontalFlip(0.0).random_map(element, rng)
    np.testing.assert_array_equal(same["image"], element["image"])

  def test_random_resize_shorter_edge(self):
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(30):
      element = self._element(rng, 40, 64)
      out = transforms.RandomResizeShorter(20, 24).random_map(element, rng)
      h, w = out["label"].shape
      self.assertBetween(h, 20, 24)
      self.assertEqual(w, int(h * 64 / 40))
      self.assertEqual(out["image"].shape, (h, w, 3))
      self.assertTrue(set(np.unique(out["label"])) <=
                      set(np.unique(element["label"])))
      sizes.add(h)
    self.assertEqual(sizes, {20, 21, 22, 23, 24})

  def test_encodings(self):
    image = np.array([[[10, 20, 30]]], np.uint8)
    np.testing.assert_allclose(
        transforms.encode(image, "bgr_mean")[0, 0],
        [30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], rtol=1e-6)
    np.testing.assert_allclose(
        transforms.encode(image, "rgb_imagenet")[0, 0],
        [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
         (30 / 255 - 0.406) / 0.225], rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "encoding='hsv'"):
      transforms.encode(image, "hsv")
    # The same function runs on the device inside the jitted steps.
    np.testing.assert_allclose(
        jax.jit(transforms.encode, static_argnums=1)(image, "bgr_mean"),
        transforms.encode(image, "bgr_mean"), rtol=1e-6)


class SyntheticTest(absltest.TestCase):

  def test_deterministic_and_domains_differ(self):
    a, la = synthetic.render("source", 5, seed=1, height=32, width=64)
    b, lb = synthetic.render("source", 5, seed=1, height=32, width=64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    c, _ = synthetic.render("source", 6, seed=1, height=32, width=64)
    self.assertGreater(np.abs(a.astype(int) - c).mean(), 1)
    v, _ = synthetic.render("source", 5, seed=1, split="val", height=32,
                            width=64)
    self.assertGreater(np.abs(a.astype(int) - v).mean(), 1)
    # The domains render the same classes in different colours: compare the
    # mean road colour over several images.
    road = labels.CLASS_NAMES[16].index("road")
    means = {}
    for domain in synthetic.DOMAINS:
      pixels = [img[lab == road] for img, lab in (
          synthetic.render(domain, i, height=32, width=64)
          for i in range(5))]
      means[domain] = np.concatenate(pixels).mean(0)
    self.assertGreater(np.abs(means["source"] - means["target"]).max(), 30)

  def test_classes_and_source_interface(self):
    source = synthetic.SyntheticDomain("target", 4, height=48, width=96,
                                       num_classes=19)
    present = set()
    for k in range(len(source)):
      element = source[k]
      self.assertEqual(element["image"].shape, (48, 96, 3))
      present |= set(np.unique(element["label"]).tolist())
    names = labels.CLASS_NAMES[19]
    self.assertTrue({names.index(n) for n in ("road", "sky", "building")}
                    <= present)
    self.assertTrue(present <= {names.index(n)
                                for n in synthetic.SCENE_CLASSES} | {255})
    with self.assertRaises(IndexError):
      source[4]


class PipelineTest(parameterized.TestCase):

  def test_train_batches_pair_independent_streams(self):
    config = _synthetic_config()
    batches = [next(it) for it in [input_pipeline.create_train_iterator(
        config)] for _ in range(6)]
    b = batches[0]
    self.assertEqual(b["source"]["image"].shape, (2, 20, 28, 3))
    self.assertEqual(b["source"]["image"].dtype, np.uint8)
    self.assertEqual(b["target"]["label"].shape, (2, 20, 28))
    self.assertTrue(np.all(b["source"]["has_label"]))
    self.assertFalse(np.any(b["target"]["has_label"]))
    # Each side equals its own stream, built alone with the same seed.
    for k, side in enumerate(("source", "target")):
      domain = (config.data.source, config.data.target)[k]
      stream = input_pipeline.train_stream(
          input_pipeline.create_source(domain, config.data, 16), config.data,
          config.seed * 2 + k)
      for step in range(6):
        for i in range(2):
          element = stream[2 * step + i]
          self.assertEqual(batches[step][side]["name"][i], element["name"])
          np.testing.assert_array_equal(batches[step][side]["label"][i],
                                        element["label"])
    # One source epoch (10 images) covers every source image once.
    names = np.concatenate([x["source"]["name"] for x in batches[:5]])
    self.assertLen(set(names), 10)

  def test_processes_load_their_share_of_the_one_process_global_batch(self):
    # The global record stream (module docstring of input_pipeline): with
    # P processes, process p's local batch k is rows [p*b, (p+1)*b) of the
    # one-process batch k (images, labels, augmentation, pairing).
    config = _synthetic_config(num_source=9, num_target=7)
    config.train.batch_size = 4
    one = input_pipeline.create_train_iterator(config)
    expected = [next(one) for _ in range(5)]  # wraps around both epochs
    for count in (2, 4):
      parts = [input_pipeline.create_train_iterator(config, p, count)
               for p in range(count)]
      for k in range(5):
        local = [next(it) for it in parts]
        for side in ("source", "target"):
          for key in ("image", "label", "index", "name"):
            np.testing.assert_array_equal(
                np.concatenate([x[side][key] for x in local]),
                expected[k][side][key], err_msg=f"{count} {k} {side} {key}")
    with self.assertRaisesRegex(ValueError, "batch size 4 .* process count 3"):
      input_pipeline.create_train_iterator(config, 0, 3)

  def test_state_is_topology_free(self):
    # A state taken from process 1 of 2 after 3 global batches resumes one
    # process (and 4) at global batch 3; a global batch that does not
    # divide the position is refused with the numbers.
    config = _synthetic_config()
    config.train.batch_size = 4
    one = input_pipeline.create_train_iterator(config)
    expected = [next(one) for _ in range(4)][3]
    two = input_pipeline.create_train_iterator(config, 1, 2)
    for _ in range(3):
      next(two)
    state = json.loads(json.dumps(two.get_state()))
    self.assertEqual(state["records"], 12)
    for count in (1, 4):
      parts = [input_pipeline.create_train_iterator(config, p, count)
               for p in range(count)]
      for it in parts:
        it.set_state(state)
      got = np.concatenate([next(it)["source"]["image"] for it in parts])
      np.testing.assert_array_equal(got, expected["source"]["image"])
    config.train.batch_size = 8
    with self.assertRaisesRegex(ValueError, "record 12 .*batch_size=8"):
      input_pipeline.create_train_iterator(config).set_state(state)

  @parameterized.parameters(0, 2)
  @pytest.mark.slow
  def test_state_restore_gives_the_next_batch(self, workers):
    config = _synthetic_config(workers=workers)
    it = input_pipeline.create_train_iterator(config)
    for _ in range(3):
      next(it)
    state = it.get_state()
    expected = next(it)
    resumed = input_pipeline.create_train_iterator(config)
    resumed.set_state(state)
    got = next(resumed)
    for side in ("source", "target"):
      np.testing.assert_array_equal(got[side]["image"],
                                    expected[side]["image"])
      np.testing.assert_array_equal(got[side]["name"], expected[side]["name"])

  def test_eval_sees_every_image_once_across_processes(self):
    config = _synthetic_config(num_target=7)
    config.eval.batch_size = 4  # 2 per process; 7 images -> 8 slots
    names, counts = [], []
    for process in range(2):
      it, total = input_pipeline.create_eval_iterator(config, process, 2)
      self.assertEqual(total, 7)
      batches = list(it)
      counts.append(len(batches))
      for b in batches:
        self.assertEqual(b["image"].shape, (2, 16, 24, 3))
        self.assertEqual(b["label"].shape, (2, 24, 40))
        names += [n for n, m in zip(b["name"], b["mask"]) if m]
        np.testing.assert_array_equal(b["label"][~b["mask"]], 255)
    self.assertEqual(counts[0], counts[1])
    self.assertEqual(sorted(names),
                     [f"target_val_{k:06d}" for k in range(7)])
    # Deterministic: a second pass gives the same order.
    again = [n for b in input_pipeline.create_eval_iterator(config, 0, 2)[0]
             for n in b["name"]]
    first = [n for b in input_pipeline.create_eval_iterator(config, 0, 2)[0]
             for n in b["name"]]
    self.assertEqual(again, first)

  def test_eval_label_size_mismatch_is_a_clear_error(self):
    config = _synthetic_config()
    config.data.eval_label_size = (10, 10)
    it, _ = input_pipeline.create_eval_iterator(config)
    with self.assertRaisesRegex(ValueError, "eval_label_size"):
      next(it)

  def test_empty_root_is_a_clear_error(self):
    config = _synthetic_config()
    config.data.source = default_config.domain("synthia", root="")
    with self.assertRaisesRegex(ValueError, "data.<source|target|eval>.root"):
      input_pipeline.create_train_iterator(config)

  def test_on_disk_pipeline_end_to_end(self):
    root = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    fixtures.make_synthia(os.path.join(root, "synthia"), None, rng, count=4,
                          size=(30, 50))
    fixtures.make_cityscapes(os.path.join(root, "cs"), "train",
                             np.full((3, 32, 64), 7), rng, with_labels=False)
    config = _synthetic_config()
    config.data.source = default_config.domain(
        "synthia", root=os.path.join(root, "synthia"))
    config.data.target = default_config.domain(
        "cityscapes", root=os.path.join(root, "cs"), require_labels=False)
    batch = next(input_pipeline.create_train_iterator(config))
    self.assertEqual(batch["source"]["image"].shape, (2, 20, 28, 3))
    self.assertTrue(np.all(batch["source"]["label"] <= 15) or
                    np.any(batch["source"]["label"] == 255))


if __name__ == "__main__":
  absltest.main()
