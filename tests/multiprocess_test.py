"""Two local processes with jax.distributed (CPU collectives) vs one process.

Both processes run `python -m plca_jax.main` with explicit coordinator
flags, train 4 steps (checkpoint at 2 and 4), then the same command resumes
to 6. Each process reads only its own shard of the data, so the reference
single-process run is fed the same global batches: process 0's local batch
followed by process 1's, exactly how the global array is assembled.
"""

import os
import socket
import subprocess
import sys

from absl.testing import absltest
import jax
import numpy as np
import pytest

from configs import test as test_config
from plca_jax import methods
from plca_jax import sharding
from plca_jax import train
from plca_jax import writers
from plca_jax.data import input_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _config():
  config = test_config.get_config()
  config.train.batch_size = 2  # global: one image per process
  config.train.log_every = 1
  return config


def _run_two_processes(workdir, num_steps):
  port = _free_port()
  procs = []
  for process_id in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "plca_jax.main",
         f"--config={REPO}/configs/test.py", f"--workdir={workdir}",
         "--mode=train", "--config.train.batch_size=2",
         "--config.train.log_every=1", f"--config.train.num_steps={num_steps}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={process_id}"],
        env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True))
  for proc in procs:
    _, err = proc.communicate(timeout=400)
    if proc.returncode != 0:
      raise AssertionError(err[-3000:])


def _reference_losses(config, num_steps):
  """Single process, same global batches (process 0's, then process 1's)."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  method = methods.get_method(config)
  state = train.create_train_state(config, method,
                                   jax.random.key(config.seed), mesh)
  iterators = [input_pipeline.create_train_iterator(config, p, 2)
               for p in range(2)]
  step = train.create_train_step(config, method, mesh)
  losses = []
  for _ in range(num_steps):
    local = [train.next_update_batch(it, config.train.grad_accum_steps)[0]
             for it in iterators]
    batch = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=1), *local)
    state, scalars = step(state, batch, train.step_key(config))
    losses.append(float(scalars["loss"]))
  return losses


class MultiProcessTest(absltest.TestCase):

  @pytest.mark.slow
  def test_two_processes_train_checkpoint_resume_like_one(self):
    workdir = self.create_tempdir().full_path
    _run_two_processes(workdir, 4)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))),
                     ["2", "4"])
    _run_two_processes(workdir, 6)  # resumes from step 4
    records = [r for r in writers.read_metrics(workdir) if "train/loss" in r]
    self.assertEqual([r["step"] for r in records], [1, 2, 3, 4, 5, 6])
    expected = _reference_losses(_config(), 6)
    got = [r["train/loss"] for r in records]
    # Two processes sum gradients and BatchNorm moments in another order
    # than one; the first updates agree to float precision, later ones
    # drift once such a difference flips a discrete choice (an association
    # argmax, the Lovasz sort): measured on this CPU, 1e-6 up to step 3,
    # then 1.2e-4 and up to 1.0e-3 relative at step 5 (the same with the
    # code before the method seam).
    np.testing.assert_allclose(got[:3], expected[:3], rtol=1e-5)
    np.testing.assert_allclose(got, expected, rtol=3e-3)


if __name__ == "__main__":
  absltest.main()
