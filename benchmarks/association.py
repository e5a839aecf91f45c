r"""Time and memory of L_fass + L_cass, forward + backward, chunked vs not.

One source/target image pair at the feature resolution of a 730x730 crop
(92x92 pixels, C=2048 features, M=16 classes), both association losses with
target aggregation, gradients w.r.t. both feature maps and both logit maps.
Each setting runs in its own process, so peak resident memory is its own.

    python benchmarks/association.py                      # 92x92, C=2048
    python benchmarks/association.py --chunk_sizes=none,256,512,1024
    python benchmarks/association.py --chunk_sizes=256,torch

`torch` in --chunk_sizes times the same two losses in PyTorch, computed the
release's way (benchmarks/torch_plca.py: dense (L x L) matrices, autograd),
on the same inputs: the same-machine reference for the figures above.
Every setting also prints the machine's plain matrix-product rate (one
(256, C) x (C, L) float32 product, measured just before), since this
shared machine's speed drifts by tens of percent between days and the
association is made of such products.

Prints, per setting: compile time, mean wall time per step after warm-up,
XLA temporary buffers of the compiled step, the peak resident memory while
the step runs (warm-up included) above the RSS just before it (inputs and
compiled code resident, the compiler's freed heap trimmed), and the
process's overall peak RSS (compilation included).
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report


def _rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("VmRSS not found in /proc/self/status")


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
  """Samples VmRSS every `interval` seconds in a thread; keeps the maximum.

  The process's high-water mark (ru_maxrss) also counts XLA's compiler, so
  the execution's own peak is sampled around the timed steps only.
  """

  def __init__(self, interval=0.002):
    self.interval = interval
    self.peak = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_mb())
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def time_steps(step, repeats):
  """Runs step() once untimed, then `repeats` times timed.

  Returns (mean seconds, the last value, peak resident memory growth in MB
  above the resident set before the first run, the freed heap trimmed).
  """
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  rss_before = _rss_mb()
  times = []
  with RssSampler() as sampler:
    step()  # warm-up, not timed
    for _ in range(repeats):
      t0 = time.perf_counter()
      value = step()
      times.append(time.perf_counter() - t0)
  return sum(times) / len(times), value, sampler.peak - rss_before


def product_gflops(channels, pixels, repeats=10):
  """GFLOP/s of a plain (256, C) x (C, L) float32 product under jit."""
  import jax  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(1), (256, channels))
  b = jax.random.normal(jax.random.key(2), (pixels, channels))
  dot = jax.jit(lambda x, y: x @ y.T)
  jax.block_until_ready(dot(a, b))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(dot(a, b))
  return 2 * 256 * channels * pixels * repeats / (
      time.perf_counter() - t0) / 1e9


def make_inputs(size, channels, classes):
  """Features (ReLU), logits and blocky labels of one pair, as jax arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (1, size, size)
  feats_s = jax.nn.relu(jax.random.normal(keys[0], shape + (channels,)))
  feats_t = jax.nn.relu(jax.random.normal(keys[1], shape + (channels,)))
  logits_s = 3 * jax.random.normal(keys[2], shape + (classes,))
  logits_t = 3 * jax.random.normal(keys[3], shape + (classes,))
  # Blocky labels, like a real label map downsampled to the feature grid.
  labels = jax.image.resize(
      jax.random.randint(keys[4], (1, 6, 6), 0, classes).astype(jnp.float32),
      shape, "nearest").astype(jnp.int32)
  return feats_s, feats_t, logits_s, logits_t, labels


def run_torch(size, channels, classes, repeats):
  """The same losses in PyTorch, release-style; returns a dict of figures."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_plca  # pylint: disable=g-import-not-at-top
  gflops = product_gflops(channels, size * size)
  arrays = [torch.from_numpy(np.array(x)) for x in
            make_inputs(size, channels, classes)]
  feats_s, feats_t, logits_s, logits_t = (
      x.reshape(1, size * size, -1).requires_grad_() for x in arrays[:4])
  labels = arrays[4].reshape(1, -1).long()

  def step():
    for x in (feats_s, feats_t, logits_s, logits_t):
      x.grad = None
    loss = (torch_plca.association(feats_s, feats_t, labels, "cos") +
            torch_plca.association(torch.softmax(logits_s, 2),
                                   torch.softmax(logits_t, 2), labels, "kl"))
    loss.backward()
    return float(loss.detach())

  step_s, value, growth = time_steps(step, repeats)
  return {
      "chunk_size": "torch", "loss": value, "compile_s": 0.0,
      "step_s": step_s, "xla_temp_mb": float("nan"),
      "step_rss_growth_mb": growth,
      "process_peak_rss_mb": _peak_rss_mb(), "product_gflops": gflops,
  }


def run_one(size, channels, classes, chunk_size, repeats):
  """Runs one setting in this process; returns a dict of figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from plca_jax import losses  # pylint: disable=g-import-not-at-top

  gflops = product_gflops(channels, size * size)
  feats_s, feats_t, logits_s, logits_t, labels = make_inputs(
      size, channels, classes)

  def loss_fn(fs, ft, ls, lt):
    fass = losses.association_loss(fs, ft, labels, "cos",
                                   chunk_size=chunk_size)
    cass = losses.association_loss(jax.nn.softmax(ls), jax.nn.softmax(lt),
                                   labels, "kl", chunk_size=chunk_size)
    return fass + cass

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
  args = (feats_s, feats_t, logits_s, logits_t)
  jax.block_until_ready(args)

  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp_mb = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")

  # The compiler's freed heap is handed back to the OS first, so that the
  # baseline is the resident set the step itself starts from.
  step_s, value, growth = time_steps(
      lambda: float(jax.block_until_ready(compiled(*args))[0]), repeats)
  return {
      "chunk_size": chunk_size, "loss": value,
      "compile_s": compile_s, "step_s": step_s,
      "xla_temp_mb": temp_mb,
      "step_rss_growth_mb": growth,
      "process_peak_rss_mb": _peak_rss_mb(), "product_gflops": gflops,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=92,
                      help="feature map height = width (92 for 730 crops)")
  parser.add_argument("--channels", type=int, default=2048)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--chunk_sizes", default="none,256",
                      help="comma-separated; 'none' = one chunk")
  parser.add_argument("--repeats", type=int, default=2)
  report.add_flag(parser)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.worker == "torch":
    print(json.dumps(run_torch(args.size, args.channels, args.classes,
                               args.repeats)))
    return
  if args.worker is not None:
    chunk = None if args.worker == "none" else int(args.worker)
    print(json.dumps(run_one(args.size, args.channels, args.classes, chunk,
                             args.repeats)))
    return

  results = []
  for chunk in args.chunk_sizes.split(","):
    cmd = [sys.executable, __file__, f"--worker={chunk}",
           f"--size={args.size}", f"--channels={args.channels}",
           f"--classes={args.classes}", f"--repeats={args.repeats}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      sys.exit(f"setting chunk_size={chunk} failed:\n{proc.stderr}")
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

  pixels = args.size * args.size
  print(f"L_fass + L_cass forward+backward, one pair, {args.size}x{args.size}"
        f" = {pixels} pixels, C={args.channels}, M={args.classes}")
  print(f"{'chunk_size':>10} {'compile s':>10} {'step s':>8} "
        f"{'XLA temp MB':>12} {'step RSS +MB':>13} {'process peak MB':>16} "
        f"{'loss':>10} {'product GFLOP/s':>16}")
  for r in results:
    print(f"{str(r['chunk_size']):>10} {r['compile_s']:10.1f} "
          f"{r['step_s']:8.2f} {r['xla_temp_mb']:12.0f} "
          f"{r['step_rss_growth_mb']:13.0f} {r['process_peak_rss_mb']:16.0f} "
          f"{r['loss']:10.5f} {r['product_gflops']:16.0f}")
  report.emit(args, ("chunk size", "compile s", "step s", "XLA temp MB",
                     "step RSS +MB", "process peak MB", "loss",
                     "product GFLOP/s"),
              [(r["chunk_size"], f"{r['compile_s']:.1f}",
                f"{r['step_s']:.2f}", f"{r['xla_temp_mb']:.0f}",
                f"{r['step_rss_growth_mb']:.0f}",
                f"{r['process_peak_rss_mb']:.0f}", f"{r['loss']:.5f}",
                f"{r['product_gflops']:.0f}") for r in results])
  base = results[0]
  for r in results[1:]:
    print(f"chunk_size={r['chunk_size']} vs {base['chunk_size']}: time x"
          f"{r['step_s'] / base['step_s']:.2f}, step RSS growth "
          f"{100 * r['step_rss_growth_mb'] / base['step_rss_growth_mb']:.0f}%"
          f", XLA temp {100 * r['xla_temp_mb'] / base['xla_temp_mb']:.0f}%")


if __name__ == "__main__":
  main()
