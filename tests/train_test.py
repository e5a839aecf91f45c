"""End-to-end tests of training, checkpoints, metrics and evaluation."""

import glob
import os
import re
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default as default_config
from configs import test as test_config
from plca_jax import checkpointing
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import models
from plca_jax import optim
from plca_jax import train
from plca_jax import writers
from tests import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir, config):
  """Parameters of the latest checkpoint in `workdir`, as NumPy."""
  model = models.get_model(config)
  init = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros(train.image_shape(config)), train=False),
                        jax.random.key(0))
  return checkpointing.load_variables(workdir, init)["params"]


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class OptimizerTest(absltest.TestCase):

  def test_poly_schedule_sgd_and_head_multiplier(self):
    config = test_config.get_config()
    config.optim.base_lr = 0.1
    config.optim.schedule_steps = 10
    config.optim.head_lr_mult = 10.0
    config.optim.weight_decay = 0.5
    lr = optim.create_learning_rate_fn(config)
    for step in (0, 3, 9, 10, 12):
      expected = 0.1 * max(0.0, 1 - step / 10) ** 0.9
      np.testing.assert_allclose(lr(step), expected, rtol=1e-6, atol=1e-9)
      # Under jit too: optax's polynomial_schedule gives NaN at the horizon.
      np.testing.assert_allclose(jax.jit(lr)(jnp.int32(step)), expected,
                                 rtol=1e-6, atol=1e-9)
    params = {"backbone": {"w": jnp.ones(2)}, "classifier": {"w": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.create_optimizer(config)
    opt_state = tx.init(params)
    # PyTorch SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr * buf.
    p_backbone, p_head, buf_b, buf_h = 1.0, 1.0, 0.0, 0.0
    for step in range(3):
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      buf_b = 0.9 * buf_b + (1 + 0.5 * p_backbone)
      buf_h = 0.9 * buf_h + (1 + 0.5 * p_head)
      p_backbone -= float(lr(step)) * buf_b
      p_head -= 10 * float(lr(step)) * buf_h
    np.testing.assert_allclose(params["backbone"]["w"], p_backbone, rtol=1e-5)
    np.testing.assert_allclose(params["classifier"]["w"], p_head, rtol=1e-5)


class NoTensorFlowTest(absltest.TestCase):

  def test_update_and_benchmarks_import_without_tensorflow(self):
    # The GPU image has no TensorFlow (docs/cloud.md): building the
    # update and the benchmarks must not import it; only the loop's and
    # the eval-only run's writers do.
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "from plca_jax import evaluate, methods, train\n"
            "from benchmarks import association, memory, step\n"
            "try:\n"
            "  from plca_jax import writers\n"
            "except ImportError:\n"
            "  print('writers need tensorflow')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    # The guard itself works: the writers do need it.
    self.assertIn("writers need tensorflow", proc.stdout)


class StepBenchmarkTest(absltest.TestCase):

  @pytest.mark.slow
  def test_step_benchmark_times_and_profiles_a_small_update(self):
    # benchmarks/step.py builds the update as training does: it must stay
    # runnable (docs/performance.md), --profile included.
    trace_dir = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, "benchmarks/step.py", "--depth=18", "--crop=33",
         "--steps=1", "--profile=4", f"--trace_dir={trace_dir}"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = [l.split() for l in proc.stdout.splitlines()
            if l.split()[:1] == ["all"]]
    self.assertLen(rows, 1, proc.stdout)
    compile_s, median_s, min_s, loss = map(float, rows[0][1:5])
    self.assertGreater(compile_s, 0.0)
    self.assertGreater(median_s, 0.0)
    self.assertLessEqual(min_s, median_s)
    self.assertTrue(np.isfinite(loss), proc.stdout)
    events = proc.stdout.split("longest events:")[-1].strip().splitlines()
    self.assertLen(events, 4, proc.stdout)
    self.assertTrue(all(re.match(r"\s*[\d.]+ s\s+\d+x", e) for e in events),
                    events)


  @pytest.mark.slow
  def test_step_benchmark_alternates_with_a_pytorch_worker(self):
    # --torch: the same terms in PyTorch, in a worker process of its own.
    proc = subprocess.run(
        [sys.executable, "benchmarks/step.py", "--depth=18", "--crop=33",
         "--steps=1", "--terms=lsr", "--torch"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    rows = {l.split()[0]: l.split() for l in proc.stdout.splitlines()
            if l.split()[:1] == ["lsr"]}
    self.assertEqual(set(rows), {"lsr"}, proc.stdout)
    for row in rows.values():
      self.assertLen(row, 8, proc.stdout)
      median_s, torch_median_s, torch_min_s, ratio = map(
          float, (row[2], row[5], row[6], row[7]))
      self.assertGreater(torch_median_s, 0.0)
      self.assertLessEqual(torch_min_s, torch_median_s)
      self.assertGreater(ratio, 0.0)
      self.assertGreater(median_s, 0.0)


class MemoryBenchmarkTest(absltest.TestCase):

  @pytest.mark.slow
  def test_memory_benchmark_orders_the_remat_modes(self):
    # benchmarks/memory.py must stay runnable; on a small crop its
    # saved-for-backward figures order the remat modes as they should.
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--config=configs/demo.py",
         "--crop=65", "--no_compile", "--dtypes=float32",
         "--remats=none,block,block_keep_3x3"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    fits = proc.stdout.split("that fits")[-1].splitlines()
    fits = {row.split()[1]: [int(n) for n in row.split()[2:]]
            for row in fits if row.split()[:1] == ["float32"]}
    self.assertEqual(set(fits), {"none", "block", "block_keep_3x3"},
                     proc.stdout)
    for remat, counts in fits.items():
      self.assertLen(counts, 3, remat)
      self.assertEqual(counts, sorted(counts), remat)  # 16 < 32 < 80 GiB
    self.assertGreater(fits["block"][0], fits["block_keep_3x3"][0])
    self.assertGreater(fits["block_keep_3x3"][0], fits["none"][0])


class TrainAndEvaluateTest(absltest.TestCase):

  @pytest.mark.slow
  def test_train_evaluate_resume_and_metrics(self):
    workdir = self.create_tempdir().full_path
    config = test_config.get_config()
    state = train.train_and_evaluate(config, workdir)
    self.assertEqual(int(state.step), 4)
    self.assertEqual(
        sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["2", "4"])
    self.assertNotEmpty(glob.glob(os.path.join(workdir, "events.out.*")))
    records = writers.read_metrics(workdir)
    train_steps = [r["step"] for r in records if "train/loss" in r]
    self.assertEqual(train_steps, [2, 4])
    first = next(r for r in records if "train/loss" in r)
    for key in ("train/ce", "train/lovasz", "train/fass", "train/cass",
                "train/lsr_source", "train/fass_consistent",
                "train/fass_reached", "train/learning_rate",
                "train/grad_norm"):
      self.assertIn(key, first)
    self.assertTrue(np.isfinite(first["train/loss"]))
    np.testing.assert_allclose(first["train/learning_rate"],
                               0.01 * (1 - 1 / 5) ** 0.9, rtol=1e-5)
    evals = [r for r in records if "eval/miou" in r]
    self.assertEqual([r["step"] for r in evals], [4])
    self.assertBetween(evals[0]["eval/miou"], 0.0, 1.0)
    self.assertIn("eval/miou13", evals[0])
    self.assertIn("eval/iou/road", evals[0])
    self.assertTrue(any("steps_per_sec" in r for r in records))

    # Re-running resumes from step 4 and trains on to the new end.
    config.train.num_steps = 6
    state = train.train_and_evaluate(config, workdir,
                                     evaluate_during_training=False)
    self.assertEqual(int(state.step), 6)
    steps = [r["step"] for r in writers.read_metrics(workdir)
             if "train/loss" in r]
    self.assertEqual(steps, [2, 4, 6])

    # A new run initialised from this workdir starts from its parameters.
    fresh = test_config.get_config()
    fresh.init_from = workdir
    started = train.create_train_state(fresh, methods.get_method(fresh),
                                       jax.random.key(1),
                                       train.sharding.create_mesh())
    self.assertEqual(int(started.step), 0)
    self.assertLess(_max_diff(jax.device_get(started.params),
                              _params(workdir, config)), 1e-7)
    fresh.init_from = os.path.join(workdir, "nothing")
    with self.assertRaisesRegex(FileNotFoundError, "nothing"):
      train.create_train_state(fresh, methods.get_method(fresh),
                               jax.random.key(1),
                               train.sharding.create_mesh())

    # Eval-only on the latest checkpoint, with and without aggregation.
    scores = evaluate.evaluate_checkpoint(config, workdir)
    config.eval.aggregate = False
    plain = evaluate.evaluate_checkpoint(config, workdir)
    self.assertNotEqual(scores["pixel_accuracy"], plain["pixel_accuracy"])

  @pytest.mark.slow
  def test_on_disk_synthia_to_cityscapes(self):
    root = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    fixtures.make_synthia(os.path.join(root, "SYNTHIA"), None, rng, count=4,
                          size=(40, 64))
    cityscapes = os.path.join(root, "cityscapes")
    fixtures.make_cityscapes(cityscapes, "train", np.zeros((4, 40, 80)), rng,
                             with_labels=False)
    val_ids = rng.integers(0, 34, (3, 40, 80))
    fixtures.make_cityscapes(cityscapes, "val", val_ids, rng)
    config = test_config.get_config()
    config.data.source = default_config.domain(
        "synthia", root=os.path.join(root, "SYNTHIA"))
    config.data.target = default_config.domain(
        "cityscapes", root=cityscapes, require_labels=False)
    config.data.eval = default_config.domain("cityscapes", root=cityscapes,
                                             split="val")
    config.data.eval_image_size = (24, 48)
    config.data.eval_label_size = (40, 80)
    config.train.num_steps = 2
    workdir = self.create_tempdir().full_path
    train.train_and_evaluate(config, workdir)
    records = writers.read_metrics(workdir)
    self.assertTrue(np.isfinite(records[-1]["eval/miou"]))
    self.assertEqual([r["step"] for r in records if "train/loss" in r], [2])

  @pytest.mark.slow
  def test_non_finite_loss_stops_and_keeps_last_checkpoint(self):
    workdir = self.create_tempdir().full_path
    config = test_config.get_config()
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    original = train.train_step

    def diverging_step(state, batch, rng, phase=0, **kwargs):
      new_state, scalars = original(state, batch, rng, phase, **kwargs)
      nan = jnp.where(state.step >= 2, jnp.nan, 0.0)  # from the 3rd update
      new_state = new_state.replace(
          params=jax.tree.map(lambda p: p + nan, new_state.params))
      return new_state, {**scalars, "loss": scalars["loss"] + nan}

    train.train_step = diverging_step
    try:
      with self.assertRaisesRegex(FloatingPointError,
                                  "non-finite loss nan .* up to 3"):
        train.train_and_evaluate(config, workdir,
                                 evaluate_during_training=False)
    finally:
      train.train_step = original
    manager = checkpointing.create_manager(workdir)
    self.assertEqual(manager.latest_step(), 2)
    params = _params(workdir, config)
    self.assertTrue(all(np.all(np.isfinite(p))
                        for p in jax.tree.leaves(params)))

  @pytest.mark.slow
  def test_console_log_file_and_profile(self):
    workdir = self.create_tempdir().full_path
    proc = subprocess.run(
        [sys.executable, "-m", "plca_jax.main",
         f"--config={REPO}/configs/test.py", f"--workdir={workdir}",
         "--config.train.profile_steps=2",
         "--config.train.profile_first_step=1"],
        env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
        text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    # Start-up summary, one line per log step, the evaluation table.
    self.assertLess(len(lines), 40, proc.stderr)
    self.assertTrue(any("63,204 parameters" in l for l in lines))
    progress = [l for l in lines if re.search(r"step \d+/4 \| [\d.]+ "
                                              r"steps/s \| ETA", l)]
    self.assertEqual(len(progress), 2, proc.stderr)
    self.assertTrue(any("mIoU" in l for l in lines))
    self.assertFalse(any("checkpoint_manager.py" in l for l in lines))
    # The libraries' INFO lines are in the log file.
    with open(os.path.join(workdir, "logs", "process_0.log")) as f:
      log = f.read()
    self.assertIn("checkpoint_manager.py", log)
    self.assertIn("Config:", log)
    traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*",
                                    "*.xplane.pb"))
    self.assertLen(traces, 1)

  @pytest.mark.slow
  def test_sigterm_checkpoints_and_exits_cleanly(self):
    workdir = self.create_tempdir().full_path
    proc = subprocess.Popen(
        [sys.executable, "-m", "plca_jax.main",
         f"--config={REPO}/configs/test.py", f"--workdir={workdir}",
         "--mode=train", "--config.train.num_steps=1000",
         "--config.train.checkpoint_every=2"],
        env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
      self.assertIsNone(proc.poll(), "the run ended early")
      self.assertLess(time.time(), deadline, "no checkpoint appeared")
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    self.assertEqual(proc.returncode, 0, stderr[-2000:])
    self.assertIn("Stopped at step", stderr)
    stopped = int(re.findall(r"Stopped at step (\d+)", stderr)[-1])
    self.assertEqual(checkpointing.create_manager(workdir).latest_step(),
                     stopped)
    self.assertEqual(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")),
                     [])


if __name__ == "__main__":
  absltest.main()
