"""plca_jax.tools.unsupervised_segment (Kanezaki 2018)."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import test as test_config
from plca_jax import models
from plca_jax.tools import unsupervised_segment as us

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(h=48, w=64, seed=0):
  """Three regions (background, a disc, a rectangle) of distinct colours
  plus noise; returns (uint8 image, (H, W) region ids)."""
  rng = np.random.default_rng(seed)
  truth = np.zeros((h, w), np.int32)
  yy, xx = np.mgrid[:h, :w]
  truth[(yy - 24)**2 + (xx - 18)**2 < 12**2] = 1
  truth[8:40, 38:58] = 2
  colours = np.array([[40, 90, 200], [220, 60, 40], [60, 200, 80]])
  image = colours[truth] + rng.normal(0, 12, (h, w, 3))
  return np.clip(image, 0, 255).astype(np.uint8), truth


SMALL = dict(channels=32, n_segments=200, compactness=10, max_iters=100)


class SuperpixelDefaultTest(absltest.TestCase):

  def test_the_default_count_scales_with_the_image(self):
    self.assertEqual(us.default_superpixels(321, 481), 10_000)
    self.assertEqual(us.default_superpixels(96, 96), 597)
    image, truth = _scene(96, 96)
    # 10,000 asked of 9,216 pixels: every pixel its own superpixel, and
    # the refinement cannot merge anything.
    self.assertEqual(int(us.superpixels_of(image, 10_000).max()) + 1,
                     96 * 96)
    self.assertBetween(int(us.superpixels_of(image).max()) + 1, 400, 800)
    segments, _ = us.segment_image(image, channels=32, max_iters=100)
    self.assertLessEqual(len(np.unique(segments)), 5)
    self.assertGreater(us.best_match_iou(segments, truth)[1], 0.9)


class PartsTest(absltest.TestCase):

  def test_refine_is_the_superpixel_majority(self):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (9, 11))
    superpixels = rng.integers(0, 7, (9, 11))
    got = np.asarray(us.refine(jnp.asarray(labels), jnp.asarray(superpixels),
                               7, 5))
    for s in range(7):  # plain loop: most frequent, lowest on ties
      inside = superpixels == s
      if inside.any():
        counts = np.bincount(labels[inside], minlength=5)
        self.assertTrue(np.all(got[inside] == np.argmax(counts)))

  def test_cross_entropy_matches_numpy(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 5, 6))
    t = rng.integers(0, 6, (4, 5))
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    want = -np.mean(np.log(np.take_along_axis(p, t[..., None], -1)))
    np.testing.assert_allclose(us.cross_entropy(jnp.asarray(x),
                                                jnp.asarray(t)), want,
                               rtol=1e-5)
    grad = jax.grad(lambda v: us.cross_entropy(v, jnp.asarray(t)))(
        jnp.asarray(x, jnp.float32))
    onehot = np.eye(6)[t]
    np.testing.assert_allclose(grad, (p - onehot) / t.size, atol=1e-6)

  def test_scores_on_hand_built_labelings(self):
    a = np.array([0, 0, 1, 1])
    self.assertAlmostEqual(us.adjusted_rand_index(a, [5, 5, 3, 3]), 1.0)
    # Contingency [[2, 0], [1, 1]]: index 1 = expected 1 -> ARI 0.
    self.assertAlmostEqual(us.adjusted_rand_index(a, [0, 0, 0, 1]), 0.0)
    segments = np.array([[0, 0, 1], [2, 2, 1]])
    labels = np.array([[3, 3, 3], [4, 255, 4]])
    per_class, mean = us.best_match_iou(segments, labels)
    # Class 3: segment 0 covers 2 of its 3 pixels, nothing else -> 2/3.
    # Class 4: segment 2 (its ignored pixel left out) -> 1/2; segment 1
    # -> 1/3 (pixel (1, 2) of 4 plus (0, 2) of 3).
    self.assertEqual(per_class, {3: 2 / 3, 4: 1 / 2})
    self.assertAlmostEqual(mean, (2 / 3 + 1 / 2) / 2)
    np.testing.assert_array_equal(us.consecutive(np.array([[7, 7, 2],
                                                           [9, 2, 7]])),
                                  [[0, 0, 1], [2, 1, 0]])


class SegmentTest(absltest.TestCase):

  def test_finds_the_three_regions_of_a_synthetic_image(self):
    image, truth = _scene()
    segments, info = us.segment_image(image, **SMALL)
    self.assertLessEqual(info["segments"], 5)
    self.assertLess(info["iterations"], SMALL["max_iters"])  # converged
    self.assertGreater(us.adjusted_rand_index(segments, truth), 0.85)
    self.assertGreater(us.best_match_iou(segments, truth)[1], 0.9)
    # Without training the net's argmax is no segmentation.
    untrained, _ = us.segment_image(image, **{**SMALL, "max_iters": 1})
    self.assertLess(us.adjusted_rand_index(untrained, truth), 0.5)

  @pytest.mark.slow
  def test_checkpoint_features_mode(self):
    config = test_config.get_config()
    model = models.get_model(config)
    variables = model.init(jax.random.key(0),
                           jnp.zeros((1, *config.data.crop_size, 3)))
    directory = os.path.join(self.create_tempdir().full_path, "weights")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(directory, {"params": variables["params"],
                                    "batch_stats": variables["batch_stats"]})
      checkpointer.wait_until_finished()
    extractor = us.FeatureExtractor(config, directory)
    image, _ = _scene()
    features = np.asarray(extractor(image))
    self.assertEqual(features.shape, (48, 64, 32))  # R18 width 4: 8 x 4
    self.assertTrue(np.all(np.isfinite(features)))
    segments, info = us.segment_image(image, extractor,
                                      **{**SMALL, "max_iters": 5})
    self.assertEqual(segments.shape, (48, 64))
    self.assertEqual(info["segments"], segments.max() + 1)

  @pytest.mark.slow
  def test_evaluation_images_are_segmented_and_scored(self):
    out = self.create_tempdir().full_path
    summary = us.run_on_eval_images(test_config.get_config(), out, 2,
                                    **{**SMALL, "max_iters": 3})
    self.assertLen(summary["images"], 2)
    with open(os.path.join(out, "scores.json")) as f:
      self.assertEqual(json.load(f)["mean_ari"], summary["mean_ari"])
    for image in summary["images"]:
      self.assertBetween(image["best_match_miou"], 0.0, 1.0)
      self.assertTrue(os.path.exists(os.path.join(
          out, os.path.basename(image["name"]) + "_labels.png")))

  @pytest.mark.slow
  def test_command_line_on_a_png(self):
    out = self.create_tempdir().full_path
    image, _ = _scene()
    path = os.path.join(out, "scene.png")
    Image.fromarray(image).save(path)
    small = ["--channels=32", "--n_segments=200", "--compactness=10",
             "--max_iters=60"]
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "plca_jax.tools.unsupervised_segment",
         f"--out={out}", *small, *args], env={**os.environ,
                                              "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=300)
    proc = run(f"--image={path}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertRegex(proc.stdout, r"scene.png: \d+ segments")
    labels = np.asarray(Image.open(os.path.join(out, "scene_labels.png")))
    self.assertEqual(labels.shape, (48, 64))
    overlay = np.asarray(Image.open(os.path.join(out, "scene_overlay.png")))
    self.assertEqual(overlay.shape, (48, 64, 3))
    bad = run("--image=/nonexistent.png")
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("/nonexistent.png", bad.stderr)


if __name__ == "__main__":
  absltest.main()
