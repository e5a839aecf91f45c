"""Tests of the one-command recipes (plca_jax/recipes.py)."""

import os

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from plca_jax import checkpointing
from plca_jax import recipes
from plca_jax import writers
from plca_jax.data import input_pipeline
from plca_jax.methods import pseudo_labels


def _config(method):
  config = test_config.get_config()
  config.method = method
  config.train.num_steps = 2
  config.eval.aggregate = False
  return config


class RecipesTest(absltest.TestCase):

  @pytest.mark.slow
  def test_pixel_contrast_runs_both_stages_once(self):
    config = _config("pixel_contrast")
    workdir = self.create_tempdir().full_path
    result = recipes.pixel_contrast(config, workdir)
    self.assertEqual(result, os.path.join(workdir, "stage2"))
    for stage in ("stage1", "stage2"):
      manager = checkpointing.create_manager(os.path.join(workdir, stage))
      self.assertEqual(manager.latest_step(), 2)
    # A pseudo-label per target training image, in the label's value range.
    pseudo = os.path.join(workdir, "pseudo_labels")
    self.assertTrue(os.path.exists(os.path.join(pseudo, recipes.COMPLETE)))
    target = input_pipeline.create_source(config.data.target, config.data,
                                          config.model.num_classes)
    for i in range(len(target)):
      label = np.asarray(Image.open(pseudo_labels.path_of(
          pseudo, target[i]["name"])))
      self.assertEqual(label.shape, target[i]["image"].shape[:2])
      self.assertTrue(np.all((label < config.model.num_classes) |
                             (label == 255)))
    # Stage 2 trained with the contrastive term on those labels.
    records = writers.read_metrics(result)
    self.assertGreater([r for r in records if "train/contrast" in r][-1]
                       ["train/contrast"], 0.0)
    self.assertTrue(np.isfinite([r for r in records if "eval/miou" in r][-1]
                                ["eval/miou"]))
    # Run again: nothing is trained or written a second time.
    before = {s: len(writers.read_metrics(os.path.join(workdir, s)))
              for s in ("stage1", "stage2")}
    stamp = os.path.getmtime(os.path.join(pseudo, recipes.COMPLETE))
    recipes.pixel_contrast(config, workdir)
    self.assertEqual({s: len(writers.read_metrics(os.path.join(workdir, s)))
                      for s in before}, before)
    self.assertEqual(os.path.getmtime(os.path.join(pseudo, recipes.COMPLETE)),
                     stamp)

  @pytest.mark.slow
  def test_fda_mbt_trains_each_beta_then_the_round(self):
    config = _config("fda")
    config.train.num_steps = 1
    workdir = self.create_tempdir().full_path
    result = recipes.fda_mbt(config, workdir, betas=(0.01, 0.09))
    self.assertEqual(result, os.path.join(workdir, "round"))
    for run in ("beta_0.01", "beta_0.09", "round"):
      manager = checkpointing.create_manager(os.path.join(workdir, run))
      self.assertEqual(manager.latest_step(), 1)
    with open(os.path.join(workdir, "pseudo_labels", recipes.COMPLETE)) as f:
      self.assertEqual(f.read().split(), [os.path.join(workdir, "beta_0.01"),
                                          os.path.join(workdir, "beta_0.09")])
    self.assertTrue(np.isfinite([r for r in writers.read_metrics(result)
                                 if "eval/miou" in r][-1]["eval/miou"]))

  def test_a_recipe_refuses_another_method(self):
    with self.assertRaisesRegex(ValueError, "config.method='fda'.*'plca'"):
      recipes.fda_mbt(_config("plca"), self.create_tempdir().full_path)
    with self.assertRaisesRegex(ValueError, "'pixel_contrast'.*'fda'"):
      recipes.pixel_contrast(_config("fda"), self.create_tempdir().full_path)


if __name__ == "__main__":
  absltest.main()
