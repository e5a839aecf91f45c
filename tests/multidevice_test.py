"""8 CPU devices vs 1, and bfloat16 vs float32 (tests/multidevice_check.py)."""

import json
import os
import subprocess
import sys

from absl.testing import absltest
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MultiDeviceTest(absltest.TestCase):

  @pytest.mark.slow
  def test_eight_devices_equal_one_and_bfloat16_is_close(self):
    env = {**os.environ, "PYTHONPATH": REPO,
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "tests.multidevice_check"],
                          env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # Same global batch, one update: sharding changes nothing but rounding.
    self.assertGreater(r["param_change"], 1e-4)  # the update did something
    self.assertLess(r["params"], 1e-5)
    self.assertLess(r["batch_stats_rel"], 1e-5)
    self.assertLess(abs(r["loss_1"] - r["loss_8"]), 1e-4 * abs(r["loss_1"]))
    for name, (one, eight) in r["terms"].items():
      self.assertLess(abs(one - eight), 1e-4 * max(abs(one), 1e-3), name)
    # The association of each image pair stays on its device: what moves
    # between devices besides all-reduces is the Lovasz term's (its sort
    # runs over the global batch at label resolution; docs/method.md,
    # Losses): its class columns by one all-to-all, the labels by
    # all-gathers of the batch's pixels. No feature or stride-8 map is
    # gathered, nothing is exchanged piecewise (collective-permute).
    self.assertNotEmpty(r["all_gathers"])
    for shape in r["all_gathers"]:
      dims = shape.split("[")[1].rstrip("]").split(",")
      self.assertEqual(int(np.prod([int(d) for d in dims])),
                       r["lovasz_pixels"], shape)
    self.assertEqual(r["exchanges"], ["all-to-all"])
    # No reduce-window spans a long axis (a sharded jnp.cumsum does: it cost
    # 360x on 2 devices); the largest left is the 3x3 max-pool.
    self.assertLessEqual(r["max_reduce_window"], 9)
    # bfloat16 compute: finite, float32 parameters, close to float32.
    self.assertTrue(r["bf16_finite"])
    self.assertEqual(r["bf16_param_dtype"], "float32")
    self.assertLess(abs(r["bf16_loss"] - r["loss_1"]), 0.01 * r["loss_1"])
    self.assertLess(r["bf16_params"], 0.25 * r["param_change"])


if __name__ == "__main__":
  absltest.main()
