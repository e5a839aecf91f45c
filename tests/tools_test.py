"""plca_jax.tools: association figures and statistics, class overlap."""

import csv
import json
import os
import subprocess
import sys

from absl.testing import absltest
import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from plca_jax import train
from plca_jax.tools import associations
from plca_jax.tools import class_overlap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_real_figure(test, path, min_size=(300, 300)):
  test.assertGreater(os.path.getsize(path), 10_000)
  image = np.asarray(Image.open(path).convert("RGB"))
  test.assertGreaterEqual(image.shape[1], min_size[0])
  test.assertGreaterEqual(image.shape[0], min_size[1])
  # Not blank: many distinct colours, and not mostly one of them.
  colours, counts = np.unique(image.reshape(-1, 3), axis=0,
                              return_counts=True)
  test.assertGreater(len(colours), 100)
  test.assertLess(counts.max() / counts.sum(), 0.95)


@pytest.mark.slow
class AssociationsToolTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = test_config.get_config()
    cls.config.train.num_steps = 2
    cls.workdir = os.path.join(absltest.get_default_test_tmpdir(), "assoc_w")
    train.train_and_evaluate(cls.config, cls.workdir,
                             evaluate_during_training=False)

  def test_figures_stats_and_confusion(self):
    out = self.create_tempdir().full_path
    paths, summary = associations.run(self.config, self.workdir, out,
                                      num_pairs=2, num_cycles=10)
    self.assertLen(paths, 2)
    for path in paths:
      _assert_real_figure(self, path)
    with open(os.path.join(out, "stats.json")) as f:
      stats = json.load(f)
    self.assertLen(stats["pairs"], 2)
    for name in ("fass", "cass"):
      for key in ("consistent", "reached", "correct"):
        self.assertBetween(stats[name][key], 0.0, 1.0)
      with open(os.path.join(out, f"confusion_{name}.csv")) as f:
        rows = list(csv.reader(f))
      self.assertLen(rows, 1 + self.config.model.num_classes)
      matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
      # The table agrees with the overall "correct" share and per class.
      if matrix.sum():
        self.assertAlmostEqual(np.trace(matrix) / matrix.sum(),
                               summary[name]["correct"], places=5)
      for entry in summary[name]["per_class"]:
        c = rows[0][1:].index(entry["class"])
        self.assertEqual(entry["cycles"], matrix[c].sum())
        self.assertAlmostEqual(entry["correct"],
                               100 * matrix[c, c] / matrix[c].sum())

  def test_per_class_table(self):
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 6]])
    rows = associations.per_class_table(confusion, ("a", "b", "c"))
    self.assertEqual([r[:3] for r in rows], [("a", 4, 75.0), ("c", 8, 75.0)])
    self.assertEqual(rows[0][3], "b (25.0%)")
    self.assertEqual(rows[1][3], "a (25.0%)")

  def test_command_line(self):
    out = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, "-m", "plca_jax.tools.associations",
         f"--config={REPO}/configs/test.py", f"--checkpoint={self.workdir}",
         f"--out={out}", "--pairs=1", "--batch_norm=batch"],
        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
        text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("fass: consistent", proc.stdout)
    self.assertIn("most frequent wrong target class", proc.stdout)
    self.assertTrue(os.path.exists(os.path.join(out, "pair_00.png")))


class ClassOverlapTest(absltest.TestCase):

  def test_counts_match_brute_force(self):
    rng = np.random.default_rng(0)
    s = rng.random((7, 5)) < 0.5
    t = rng.random((9, 5)) < 0.5
    counts = class_overlap.overlap_counts(s, t, 500, seed=3)
    pick = np.random.default_rng(3)
    si, ti = pick.integers(0, 7, 500), pick.integers(0, 9, 500)
    target_only, shared = np.zeros(5, int), np.zeros(6, int)
    for a, b in zip(si, ti):
      for c in range(5):
        target_only[c] += t[b, c] and not s[a, c]
      shared[int(np.sum(s[a] & t[b]))] += 1
    np.testing.assert_array_equal(counts["target_only"], target_only)
    np.testing.assert_array_equal(counts["shared"], shared)
    self.assertEqual(counts["shared"].sum(), 500)

  def test_run_writes_csv_and_chart(self):
    out = self.create_tempdir().full_path
    counts, paths = class_overlap.run(test_config.get_config(), 300, out)
    with open(paths[0]) as f:
      rows = list(csv.DictReader(f))
    self.assertLen(rows, 16)
    self.assertEqual([int(r["target_not_source"]) for r in rows],
                     counts["target_only"].tolist())
    with open(paths[1]) as f:
      self.assertEqual(sum(int(r["pairs"]) for r in csv.DictReader(f)), 300)
    _assert_real_figure(self, paths[2])


if __name__ == "__main__":
  absltest.main()
