"""Tests of plca_jax.schedule: the paper's update on any device count."""

import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
from ml_collections import config_flags
import pytest

from configs import demo
from configs import gta5
from configs import synthia
from plca_jax import schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(config_file, *overrides):
  """The config as plca_jax.main's command line parses it."""
  argv = ["prog", f"--config={REPO}/configs/{config_file}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


class ResolveTest(parameterized.TestCase):

  @parameterized.parameters(synthia, gta5)
  def test_paper_update_on_any_device_count(self, module):
    config = module.get_config()
    steps, horizon = config.train.num_steps, config.optim.schedule_steps
    # (devices, micro-batches, batch): 8 images per domain per update.
    for devices, accum, batch in ((1, 2, 4), (2, 2, 4), (4, 2, 4),
                                  (8, 1, 8)):
      resolved, _ = schedule.resolve(config, devices)
      self.assertEqual((resolved.train.grad_accum_steps,
                        resolved.train.batch_size), (accum, batch), devices)
      self.assertEqual((resolved.train.num_steps,
                        resolved.optim.schedule_steps,
                        resolved.optim.base_lr, resolved.loss.lovasz_weight),
                       (steps, horizon, 2.5e-4, 3.0))
      self.assertEqual(resolved.eval.batch_size % devices, 0)
    # More devices than images: one per device, the learning rate scaled,
    # the same epochs in fewer updates, the Lovasz weight of the paper's.
    for devices in (16, 32):
      resolved, notes = schedule.resolve(config, devices)
      scale = devices // 8
      self.assertEqual((resolved.train.grad_accum_steps,
                        resolved.train.batch_size), (1, devices))
      self.assertAlmostEqual(resolved.optim.base_lr, 2.5e-4 * scale)
      epoch = -(-2975 // devices)
      self.assertEqual(resolved.train.num_steps, steps // 372 * epoch)
      self.assertEqual(resolved.optim.schedule_steps, horizon // 372 * epoch)
      self.assertEqual(resolved.loss.lovasz_weight, 3.0)
      self.assertTrue(any("learning rate x" in n for n in notes), notes)
      again, more = schedule.resolve(resolved, devices)  # idempotent
      self.assertEqual(more, [])
      self.assertEqual(again.optim.base_lr, resolved.optim.base_lr)
    for devices in (3, 6):
      with self.assertRaisesRegex(ValueError, r"does not split over "
                                  f"{devices} devices; it does on "
                                  r"\[1, 2, 4, 8\]"):
        schedule.resolve(config, devices)

  def test_the_config_is_not_modified(self):
    config = synthia.get_config()
    schedule.resolve(config, 16)
    self.assertEqual((config.train.batch_size, config.optim.base_lr,
                      config.train.num_steps), (4, 2.5e-4, 2976))

  def test_without_auto_split_an_uneven_batch_is_an_error(self):
    config = demo.get_config()  # batch 4, auto_split off
    self.assertEqual(schedule.resolve(config, 2)[0].train.batch_size, 4)
    with self.assertRaisesRegex(ValueError, "batch size 4 .* not divisible "
                                "by the number of devices 8.*auto_split"):
      schedule.resolve(config, 8)

  def test_batch_overrides_recompute_what_depends_on_it(self):
    config = _parse("synthia.py", "--config.train.batch_size=2")
    # 4 images per update: ceil(2975 / 4) = 744 updates an epoch.
    self.assertEqual((config.train.num_steps, config.optim.schedule_steps),
                     (8 * 744, 10 * 744))
    self.assertEqual(config.loss.lovasz_weight, 1.5)  # 0.75 x 2 x 4 / 4
    config = _parse("gta5.py", "--config.train.grad_accum_steps=4",
                    "--config.train.num_steps=100",
                    "--config.loss.lovasz_weight=0.75")
    # Set explicitly: kept. Derived: 16 images, 186 updates an epoch.
    self.assertEqual((config.train.num_steps, config.loss.lovasz_weight),
                     (100, 0.75))
    self.assertEqual(config.optim.schedule_steps, 30 * 186)


class SliceTest(absltest.TestCase):

  @pytest.mark.slow
  def test_paper_configs_lower_on_1_to_32_devices(self):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.slice_check"], cwd=REPO,
        env={**os.environ,
             "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=32"},
        capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, steps in (("synthia", 2976), ("gta5", 10416)):
      got = result[name]
      self.assertEqual(got["1"][:2], [2, 4])
      self.assertEqual(got["4"][:2], [2, 4])
      self.assertEqual(got["8"][:2], [1, 8])
      self.assertEqual(got["32"][:2], [1, 32])
      for devices in ("1", "2", "4", "8"):
        self.assertEqual(got[devices][0] * got[devices][1], 8)
        self.assertEqual(got[devices][3:], [steps, 2.5e-4, 3.0])
      self.assertEqual(got["16"][3:], [steps // 2, 5e-4, 3.0])
    self.assertEqual(result["synthia"]["16"][2], "1x16x33x33x3")


if __name__ == "__main__":
  absltest.main()
