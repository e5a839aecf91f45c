"""Two local processes (jax.distributed, CPU collectives) against one.

The global record stream makes a run's global batches independent of the
process count (input_pipeline's docstring), so the same training command
with one process and with two logs the same scalars, with no hand-built
reference; and a checkpoint written by one topology resumes on the other.
The one-process runs call `train.train_and_evaluate` in this process (what
`python -m plca_jax.main --mode=train` runs) to save start-up time; the
two-process runs are `python -m plca_jax.main` with coordinator flags.
"""

import os
import socket
import subprocess
import sys

from absl.testing import absltest
import numpy as np
import pytest

from configs import test as test_config
from plca_jax import train
from plca_jax import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Float reduction order differs between one and two processes (gradients
# and BatchNorm moments are summed across processes); measured on this
# CPU: at most 2.3e-6 relative (train/ce) over these four updates.
RTOL = 1e-4


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(pairing):
  flags = {"train.batch_size": 2, "train.log_every": 1,
           "train.checkpoint_every": 2, "train.eval_every": 1000}
  if pairing:
    flags.update({"data.pairing": "class_overlap",
                  "data.pairing_target_classes": "pseudo"})
  return flags


def _config(pairing, num_steps):
  config = test_config.get_config()
  for key, value in {**_overrides(pairing),
                     "train.num_steps": num_steps}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _one_process(workdir, num_steps, pairing=False):
  train.train_and_evaluate(_config(pairing, num_steps), workdir,
                           evaluate_during_training=False)


def _two_processes(workdir, num_steps, pairing=False):
  port = _free_port()
  flags = [f"--config.{k}={v}" for k, v in _overrides(pairing).items()]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "plca_jax.main",
       f"--config={REPO}/configs/test.py", f"--workdir={workdir}",
       "--mode=train", *flags, f"--config.train.num_steps={num_steps}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={process_id}"],
      env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for process_id in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=400)
    if proc.returncode != 0:
      raise AssertionError(err[-3000:])


def _scalars(workdir):
  """{step: {name: value}} of the training scalars, the last write of each
  step (a resumed run does not rewrite earlier steps)."""
  out = {}
  for record in writers.read_metrics(workdir):
    if "train/loss" in record:
      out[record["step"]] = {k: v for k, v in record.items()
                             if k.startswith("train/")}
  return out


class MultiProcessTest(absltest.TestCase):

  def assert_same_scalars(self, got, expected, steps):
    self.assertEqual(sorted(got), steps)
    for step in steps:
      self.assertEqual(sorted(got[step]), sorted(expected[step]))
      for name, value in expected[step].items():
        np.testing.assert_allclose(got[step][name], value, rtol=RTOL,
                                   atol=1e-7, err_msg=f"{name} step {step}")

  def assert_resumes_like_one_process(self, pairing, first, then):
    one = self.create_tempdir().full_path
    _one_process(one, 4, pairing)
    expected = _scalars(one)
    workdir = self.create_tempdir().full_path
    first(workdir, 2, pairing)
    self.assertEqual(sorted(_scalars(workdir)), [1, 2])
    then(workdir, 4, pairing)
    self.assert_same_scalars(_scalars(workdir), expected, [1, 2, 3, 4])
    return expected

  @pytest.mark.slow
  def test_two_processes_then_one_like_one_process(self):
    # Updates 1-2 on two processes (same scalars as one process), the
    # checkpoint resumed by one process (same scalars to update 4).
    self.assert_resumes_like_one_process(False, _two_processes, _one_process)

  @pytest.mark.slow
  def test_class_overlap_one_process_then_two_like_one_process(self):
    # Class-overlap pairing on predicted classes: the pairing table written
    # by one process drives two processes' picks like one process's.
    expected = self.assert_resumes_like_one_process(True, _one_process,
                                                    _two_processes)
    # First update: no target seen yet (random pairing); later the table
    # holds the model's predictions.
    self.assertEqual(expected[1]["train/pairing_known_targets"], 0.0)
    self.assertGreater(expected[4]["train/pairing_known_targets"], 0)
    self.assertIn("train/pairing_shared_classes", expected[4])


if __name__ == "__main__":
  absltest.main()
