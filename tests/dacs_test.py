"""Tests of DACS (plca_jax/methods/dacs.py) against plain implementations."""

import colorsys
import os
import shutil

from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import dacs as dacs_config
from configs import test as test_config
from plca_jax import checkpointing
from plca_jax import methods
from plca_jax import sharding
from plca_jax import train
from plca_jax.methods import base
from plca_jax.methods import dacs


def _block(**overrides):
  block = dacs.DACS.default_config()
  block.update(overrides)
  return block


class TeacherTest(absltest.TestCase):

  def test_ema_and_its_warm_up_follow_the_formula(self):
    for step in (0, 1, 2, 9, 98, 99, 100, 5000):
      expected = min(1.0 - 1.0 / (step + 1), 0.99)
      self.assertAlmostEqual(float(dacs.ema_alpha(jnp.int32(step), 0.99)),
                             expected, places=6)
    rng = np.random.default_rng(0)
    teacher = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=5)}}
    student = jax.tree.map(lambda x: x + rng.normal(size=x.shape), teacher)
    mixed = dacs.ema(teacher, student, 0.7)
    for t, s, m in zip(jax.tree.leaves(teacher), jax.tree.leaves(student),
                       jax.tree.leaves(mixed)):
      np.testing.assert_allclose(m, 0.7 * t + 0.3 * s, rtol=1e-12)


class PseudoLabelTest(absltest.TestCase):

  def test_weight_is_the_share_of_confident_pixels(self):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4.0, size=(3, 5, 7, 6))
    labels, weight = dacs.pseudo_labels(jnp.asarray(logits, jnp.float32),
                                        0.9)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(labels, probs.argmax(-1))
    for n in range(3):
      count = sum(probs[n, i, j].max() > 0.9 for i in range(5)
                  for j in range(7))
      self.assertAlmostEqual(float(weight[n]), count / 35, places=6)
    self.assertGreater(float(weight.max()), 0.0)
    self.assertLess(float(weight.min()), 1.0)

  def test_weighted_cross_entropy_against_float64(self):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 5, 3))
    labels = rng.integers(0, 3, (2, 4, 5))
    labels[0, 0, :2] = 255
    weights = rng.uniform(size=(2, 4, 5))
    got = dacs.weighted_cross_entropy(jnp.asarray(logits, jnp.float32),
                                      jnp.asarray(labels),
                                      jnp.asarray(weights, jnp.float32), 255)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total = 0.0
    for idx in np.ndindex(labels.shape):
      if labels[idx] != 255:
        total += -logp[idx + (labels[idx],)] * weights[idx]
    self.assertAlmostEqual(float(got), total / labels.size, places=5)


class ClassMixTest(absltest.TestCase):

  # Hand-built labels: four values present in image 0 (255 included), two
  # in image 1.
  LABELS = np.array([[[0, 0, 3, 3, 7, 255],
                      [0, 0, 3, 3, 7, 255],
                      [1, 1, 1, 1, 7, 7]],
                     [[5, 5, 5, 2, 2, 2],
                      [5, 5, 5, 2, 2, 2],
                      [5, 5, 5, 2, 2, 2]]])

  def test_masks_are_exactly_a_random_half_of_the_present_values(self):
    seen = [set(), set()]
    for seed in range(40):
      mask = np.asarray(dacs.class_mix_masks(
          jnp.asarray(self.LABELS), jax.random.key(seed), num_classes=8))
      for n, label in enumerate(self.LABELS):
        values = np.unique(label)
        chosen = {v for v in values if mask[n][label == v].all()}
        # Every pixel of a chosen value and nothing else.
        np.testing.assert_array_equal(mask[n], np.isin(label, list(chosen)))
        self.assertLen(chosen, (len(values) + 1) // 2)
        seen[n] |= chosen
    # Over the draws, every present value (255 too) is chosen sometimes.
    self.assertEqual(seen[0], {0, 1, 3, 7, 255})
    self.assertEqual(seen[1], {2, 5})

  def test_mixed_images_labels_and_weights_against_numpy(self):
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, (2, 3, 6, 3)).astype(np.uint8)
    target = rng.integers(0, 256, (2, 3, 6, 3)).astype(np.uint8)
    logits = rng.normal(scale=3.0, size=(2, 3, 6, 8)).astype(np.float32)
    micro = {"source": {"image": jnp.asarray(source),
                        "label": jnp.asarray(self.LABELS)},
             "target": {"image": jnp.asarray(target)}}
    # No augmentation, to compare the pasted pixels.
    block = _block(jitter_prob=0.0, blur_prob=0.0, pseudo_threshold=0.5)
    # A key whose draw pastes image 0's ignore pixels.
    for seed in range(100):
      key = jax.random.key(seed)
      images, labels, weights, pseudo, mask, stats = dacs.mixed_batch(
          micro, jnp.asarray(logits), key, num_classes=8, block=block,
          ignore_label=255)
      if np.asarray(mask)[0, 0, 5]:
        break
    mask = np.asarray(mask)
    self.assertTrue(mask[0, 0, 5])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want_pseudo = probs.argmax(-1)
    share = (probs.max(-1) > 0.5).mean(axis=(1, 2))
    np.testing.assert_array_equal(pseudo, want_pseudo)
    np.testing.assert_allclose(  # through /255 and *255
        images, np.where(mask[..., None], source, target), atol=1e-3)
    np.testing.assert_array_equal(labels, np.where(mask, self.LABELS,
                                                   want_pseudo))
    self.assertEqual(int(labels[0, 0, 5]), 255)  # pasted ignore stays
    np.testing.assert_allclose(
        weights, np.where(mask, 1.0, share[:, None, None]), rtol=1e-6)
    self.assertAlmostEqual(float(stats["mixed_source_share"]), mask.mean(),
                           places=6)
    self.assertAlmostEqual(float(stats["pseudo_weight"]), share.mean(),
                           places=6)


class AugmentationTest(absltest.TestCase):

  def test_hsv_conversions_against_colorsys(self):
    rng = np.random.default_rng(4)
    rgb = rng.uniform(size=(200, 3))
    rgb[:5] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]]
    h, s, v = (np.asarray(c) for c in dacs._rgb_to_hsv(jnp.asarray(rgb)))
    want = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    np.testing.assert_allclose(np.stack([s, v], -1), want[:, 1:], atol=1e-6)
    hue_diff = np.abs(h - want[:, 0])
    np.testing.assert_allclose(np.minimum(hue_diff, 1 - hue_diff), 0,
                               atol=1e-6)
    back = dacs._hsv_to_rgb(jnp.asarray(want[:, 0]), jnp.asarray(want[:, 1]),
                            jnp.asarray(want[:, 2]))
    np.testing.assert_allclose(back, rgb, atol=1e-6)

  def test_blur_against_numpy(self):
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(1, 30, 20, 3)).astype(np.float32)
    key = jax.random.key(0)
    got = np.asarray(dacs.gaussian_blur(jnp.asarray(images), key,
                                        (0.8, 0.8), prob=1.0))
    size = dacs.blur_kernel_size(30)
    self.assertEqual(size, 3)
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-0.5 * (x / 0.8) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(images[0].astype(np.float64), ((1, 1), (1, 1), (0, 0)),
                    mode="reflect")
    want = np.zeros_like(images[0], np.float64)
    for i in range(size):
      for j in range(size):
        want += kernel[i] * kernel[j] * padded[i:i + 30, j:j + 20]
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    self.assertEqual(dacs.blur_kernel_size(512), 51)  # the authors' at 512

  def test_augmentations_are_deterministic_given_the_key(self):
    rng = np.random.default_rng(6)
    images = jnp.asarray(rng.uniform(0, 255, (4, 16, 16, 3)), jnp.float32)
    block = _block()
    a = dacs.strong_augment(images, jax.random.key(1), block)
    b = dacs.strong_augment(images, jax.random.key(1), block)
    c = dacs.strong_augment(images, jax.random.key(2), block)
    np.testing.assert_array_equal(a, b)
    self.assertGreater(float(jnp.max(jnp.abs(a - c))), 1.0)
    self.assertGreater(float(jnp.max(jnp.abs(a - images))), 1.0)
    # Zero strength and no blur: the identity (up to the HSV round trip).
    same = dacs.strong_augment(images, jax.random.key(1), _block(
        jitter_strength=0.0, blur_prob=0.0))
    np.testing.assert_allclose(same, images, atol=1e-3)


def _dacs_test_config(plca_terms=False):
  config = test_config.get_config()
  config.method = "dacs"
  config.eval.aggregate = False
  config.dacs.plca_terms = plca_terms
  return config


class UpdateTest(absltest.TestCase):

  def test_the_teacher_moves_only_by_its_ema(self):
    config = _dacs_test_config()
    method = methods.get_method(config)
    mesh = sharding.create_mesh()
    state = train.create_train_state(config, method, jax.random.key(0), mesh)
    step = train.create_train_step(config, method, mesh)
    rng = np.random.default_rng(0)
    k, b, (h, w) = 2, 2, config.data.crop_size

    def batch():
      return {d: {"image": rng.integers(0, 256, (k, b, h, w, 3), np.uint8),
                  "label": rng.integers(0, 4, (k, b, h, w)).astype(np.int32)}
              for d in base.DOMAINS}
    teacher0 = jax.device_get(state.extra[dacs.TEACHER].params)
    state, scalars = step(state, sharding.to_global(batch(), mesh, 1),
                          train.step_key(config))
    student1 = jax.device_get(state.params)
    teacher1 = jax.device_get(state.extra[dacs.TEACHER].params)
    # alpha_0 = 0: the teacher is the updated student.
    for t, s in zip(jax.tree.leaves(teacher1), jax.tree.leaves(student1)):
      np.testing.assert_array_equal(t, s)
    self.assertFalse(all(np.array_equal(a, c) for a, c in zip(
        jax.tree.leaves(teacher0), jax.tree.leaves(teacher1))))
    state, scalars = step(state, sharding.to_global(batch(), mesh, 1),
                          train.step_key(config))
    student2 = jax.device_get(state.params)
    teacher2 = jax.device_get(state.extra[dacs.TEACHER].params)
    # alpha_1 = 1 - 1/2.
    for t1, s2, t2 in zip(jax.tree.leaves(teacher1),
                          jax.tree.leaves(student2),
                          jax.tree.leaves(teacher2)):
      np.testing.assert_allclose(t2, 0.5 * t1 + 0.5 * s2, rtol=1e-6,
                                 atol=1e-7)
    self.assertEqual(float(scalars["teacher_grad_norm"]), 0.0)
    for key in ("source_ce", "mixed_ce", "pseudo_weight",
                "mixed_source_share", "agreement"):
      self.assertTrue(np.isfinite(float(scalars[key])), key)

  @pytest.mark.slow
  def test_train_evaluate_and_resume_restore_the_teacher(self):
    root = self.create_tempdir().full_path
    whole, broken = os.path.join(root, "whole"), os.path.join(root, "broken")
    config = _dacs_test_config(plca_terms=True)
    train.train_and_evaluate(config, whole)
    # A run stopped at its checkpoint 2 (as after a SIGKILL: checkpoint 4
    # never written) resumes to the same teacher as the uninterrupted run.
    shutil.copytree(whole, broken)
    shutil.rmtree(os.path.join(broken, "checkpoints", "4"))
    state = train.train_and_evaluate(config, broken,
                                     evaluate_during_training=False)
    networks, step = checkpointing.read_networks(whole)
    self.assertEqual(step, 4)
    for a, c in zip(jax.tree.leaves(networks[dacs.TEACHER]),
                    jax.tree.leaves(jax.device_get(
                        {"params": state.extra[dacs.TEACHER].params,
                         "batch_stats":
                             state.extra[dacs.TEACHER].batch_stats}))):
      np.testing.assert_array_equal(a, c)


class ConfigTest(absltest.TestCase):

  def test_paper_settings(self):
    for source, classes in (("gta5", 19), ("synthia", 16)):
      config = dacs_config.get_config(source)
      self.assertEqual((config.method, config.model.num_classes,
                        config.train.batch_size, config.data.crop_size,
                        config.train.num_steps, config.optim.base_lr,
                        config.optim.head_lr_mult, config.dacs.ema_alpha,
                        config.dacs.pseudo_threshold),
                       ("dacs", classes, 2, (512, 512), 250_000, 2.5e-4,
                        10.0, 0.99, 0.968))
      self.assertFalse(config.eval.aggregate)
    self.assertEqual(dacs_config.get_config().data.source.name, "synthetic")
    with self.assertRaisesRegex(ValueError, "'cityscapes'"):
      dacs_config.get_config("cityscapes")
    self.assertIsInstance(dacs.DACS.default_config(),
                          ml_collections.ConfigDict)


if __name__ == "__main__":
  absltest.main()
