"""Tests of the shipped configs: derived values and strict keys."""

import os
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from configs import adaptsegnet
from configs import dacs
from configs import default
from configs import demo
from configs import fda
from configs import gta5
from configs import ldr
from configs import pixel_contrast
from configs import source_only
from configs import synthia
from configs import synthia_r18
from configs import test as test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigsTest(parameterized.TestCase):

  def test_paper_schedules(self):
    # docs/method.md, Optimisation: epoch = ceil(2975 / 4 / 2) = 372 updates.
    config = synthia.get_config()
    self.assertEqual((config.train.num_steps, config.optim.schedule_steps),
                     (8 * 372, 10 * 372))
    self.assertEqual(config.model.num_classes, 16)
    # beta1 = 0.75 x W x K: the release's 2-GPU launch, K micro-batches.
    self.assertEqual(config.loss.lovasz_weight,
                     0.75 * 2 * config.train.grad_accum_steps)
    self.assertEqual(config.loss.lovasz_weight, 3.0)
    config = gta5.get_config()
    self.assertEqual((config.train.num_steps, config.optim.schedule_steps),
                     (28 * 372, 30 * 372))
    self.assertEqual(config.model.num_classes, 19)
    config = synthia_r18.get_config()
    self.assertEqual((config.model.depth, config.train.batch_size,
                      config.train.grad_accum_steps, config.train.num_steps),
                     (18, 4, 1, 30_000))

  @parameterized.parameters(demo, gta5, synthia, synthia_r18, test_config,
                            adaptsegnet, fda, source_only, pixel_contrast,
                            ldr, dacs)
  def test_every_key_is_declared_in_default(self, module):
    keys = lambda c, p="": {p + k for k in c.keys()} | set().union(
        *[keys(v, f"{p}{k}.") for k, v in c.items() if hasattr(v, "keys")])
    self.assertEqual(keys(module.get_config()),
                     keys(default.get_config()))

  def test_pixel_contrast_stages(self):
    stage1, stage2 = (pixel_contrast.get_config(s) for s in ("stage1",
                                                             "stage2"))
    self.assertEqual((stage1.method, stage1.data.grayscale), ("pixel_contrast",
                                                              True))
    self.assertFalse(stage2.data.grayscale)
    with self.assertRaisesRegex(ValueError, "'stage3'"):
      pixel_contrast.get_config("stage3")

  def test_ldr_phases(self):
    demo_config = ldr.get_config()
    block = demo_config.ldr
    # The segmentation network's poly horizon is what follows phase 0: the
    # demo's 600 updates.
    self.assertEqual((demo_config.method, block.translation_steps,
                      demo_config.train.num_steps),
                     ("ldr", 200, 800))
    self.assertEqual(demo_config.optim.schedule_steps -
                     block.translation_steps, 600)
    paper = ldr.get_config("gta5")
    self.assertEqual((paper.ldr.gen_channels, paper.ldr.gen_blocks,
                      paper.ldr.recon_scales), (64, 9, 3))
    self.assertLess(paper.ldr.translation_steps, paper.train.num_steps)

  @parameterized.parameters(adaptsegnet, fda, source_only, ldr)
  def test_method_configs(self, module):
    for source, classes in (("gta5", 19), ("synthia", 16)):
      config = module.get_config(source)
      self.assertEqual(config.method, module.__name__.split(".")[-1])
      self.assertEqual((config.model.depth, config.model.num_classes),
                       (101, classes))
      self.assertFalse(config.eval.aggregate)  # the baselines' protocol
    with self.assertRaisesRegex(ValueError, "'cityscapes'.*gta5"):
      module.get_config("cityscapes")
    config = adaptsegnet.get_config("gta5")
    self.assertEqual((config.train.batch_size, config.optim.head_lr_mult,
                      config.adaptsegnet.lambda_adv), (1, 10.0, 0.001))

  @pytest.mark.slow
  def test_misspelt_key_and_missing_dataset_fail_before_compute(self):
    env = {**os.environ, "PYTHONPATH": REPO}
    base = [sys.executable, "-m", "plca_jax.main",
            f"--workdir={self.create_tempdir().full_path}"]
    bad_key = subprocess.run(
        base + [f"--config={REPO}/configs/test.py",
                "--config.train.num_step=3"],
        env=env, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(bad_key.returncode, 0)
    self.assertIn("num_step", bad_key.stderr)
    missing = subprocess.run(
        base + [f"--config={REPO}/configs/synthia.py",
                "--config.data.source.root=/nonexistent/SYNTHIA",
                "--config.data.target.root=/nonexistent/cityscapes"],
        env=env, capture_output=True, text=True, timeout=120)
    self.assertNotEqual(missing.returncode, 0)
    self.assertIn("/nonexistent/SYNTHIA/RGB", missing.stderr)
    self.assertIn("Expected layout", missing.stderr)


if __name__ == "__main__":
  absltest.main()
