r"""Seconds per optimizer update of the full model, compile time apart.

Builds the update exactly as training does (`train.create_train_step`) for
configs/synthia.py overridden by the flags, feeds it one fixed random batch
and times `--steps` updates after a warm-up update. `--terms` gives a
per-term breakdown, each a separate compile:
  ce       cross-entropy only
  lovasz   + Lovasz-softmax
  lsr      + LSR on both domains
  all      + L_fass + L_cass (the full PLCA objective)
`--one_pass=on` sends source and target through the network as one batch
instead of two passes (config.train.domains_in_one_pass); `--one_pass=both`
times the one-batch update alternating with the two-pass one, like
`--torch`.
`--cpu_fixes=off` drops the XLA:CPU settings of plca_jax.xla (Eigen
convolutions, materialised block outputs) and the model's XLA:CPU kernels
to show what they change; `--cpu_kernels=off` drops only the kernels (the
ASPP head as one matrix product, weight gradients as matrix products:
`DeepLabV2.head_form`, `dot_weight_grads`), `--cpu_kernels=both` times
the update with them alternating with the update without.
`--torch` times the same update in PyTorch, the two alternating update by
update (benchmarks/torch_network.py --serve, in a process of its own; for
each term set the same terms, for `all` computed the release's way,
benchmarks/torch_plca.py), so that both see the same machine load: this
shared machine's speed drifts by tens of percent within an hour, which
makes figures from separate runs hard to compare. PyTorch runs in its own
process because in this one both libraries' allocations share a heap, and
the update after each PyTorch update page-faults its buffers in again
(both sides about 10% slower).

    python benchmarks/step.py                        # R101, 321x321, all
    python benchmarks/step.py --terms=ce,lovasz,lsr,all --remat=block
    python benchmarks/step.py --depth=18 --crop=730 --dtype=bfloat16
    python benchmarks/step.py --terms=ce,all --torch --steps=5
    python benchmarks/step.py --cpu_kernels=both --steps=6
    python benchmarks/step.py --steps=2 --profile=30   # + one traced update
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import synthia
from plca_jax import methods
from plca_jax import sharding
from plca_jax import train
from plca_jax import xla

PAUSE_S = 1.0


TERMS = {
    "ce": dict(use_lovasz=False, use_lsr=False, use_fass=False,
               use_cass=False),
    "lovasz": dict(use_lsr=False, use_fass=False, use_cass=False),
    "lsr": dict(use_fass=False, use_cass=False),
    "all": {},
}


def make_config(args, terms):
  config = synthia.get_config()
  config.model.depth = args.depth
  config.model.remat = args.remat
  config.data.crop_size = (args.crop, args.crop)
  config.train.batch_size = args.batch
  config.train.grad_accum_steps = 1
  config.train.compute_dtype = args.dtype
  config.train.domains_in_one_pass = args.one_pass != "off"
  for key, value in TERMS[terms].items():
    setattr(config.loss, key, value)
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, (h, w) = config.train.batch_size, config.data.crop_size
  classes = config.model.num_classes

  def domain():
    # Blocky labels, like real label maps.
    coarse = rng.integers(0, classes, (1, n, 8, 8))
    label = np.repeat(np.repeat(coarse, -(-h // 8), 2), -(-w // 8), 3)
    return {"image": rng.integers(0, 256, (1, n, h, w, 3), np.uint8),
            "label": label[:, :, :h, :w].astype(np.uint8)}

  return {"source": domain(), "target": domain()}


class TorchWorker:
  """benchmarks/torch_network.py --serve in a subprocess: calling it runs
  one PyTorch update there and returns its loss."""

  def __init__(self, args, classes, terms):
    import subprocess  # pylint: disable=g-import-not-at-top
    command = [sys.executable,
               os.path.join(REPO, "benchmarks", "torch_network.py"),
               "--serve", f"--depth={args.depth}", f"--crop={args.crop}",
               f"--batch={args.batch}", f"--classes={classes}",
               f"--terms={terms}", f"--host_memory={args.host_memory}"]
    self._process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
    line = self._process.stdout.readline().strip()
    if line != "ready":
      self.close()
      raise RuntimeError(f"{' '.join(command)} did not start (it wrote "
                         f"{line!r}; its error is above)")

  def __call__(self):
    self._process.stdin.write("run\n")
    self._process.stdin.flush()
    line = self._process.stdout.readline()
    if not line:
      raise RuntimeError("the PyTorch worker exited (its error is above)")
    return float(line.split()[1])

  def close(self):
    self._process.stdin.close()
    self._process.wait()


def build_update(config, cpu_fixes, cpu_kernels=True):
  """(compile seconds, a callable running one update and returning its
  loss) for `config` on one device, warmed up."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  method = methods.get_method(config)
  options = None
  if not cpu_kernels or not cpu_fixes:
    method.model = method.model.clone(head_form="conv",
                                      dot_weight_grads=False)
  if not cpu_fixes:
    method.model = method.model.clone(block_barrier=False)
    options = {}
  state = train.create_train_state(config, method, jax.random.key(0), mesh)
  step = train.create_train_step(config, method, mesh,
                                 compiler_options=options)
  batch = sharding.to_global(random_batch(config), mesh, 1)
  key = train.step_key(config)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  # Progress on stderr (the table stays on stdout): on a GPU the compile
  # and the first run (autotuning) can take minutes.
  print(f"compiled in {compile_s:.1f} s; warming up", file=sys.stderr,
        flush=True)
  holder = {"state": state}

  def run():
    holder["state"], scalars = compiled(holder["state"], batch, key)
    return float(jax.block_until_ready(scalars)["loss"])

  run()  # warm-up
  return compile_s, run


def time_update(config, steps, cpu_fixes, other=None, cpu_kernels=True):
  """Compile seconds, seconds per update, final loss; with `other` (a
  callable running one update of something else) also its seconds, timed
  alternately with this update's; and the callable running one update."""
  compile_s, run = build_update(config, cpu_fixes, cpu_kernels)
  if other is not None:
    other()  # warm-up
  times, other_times = [], []
  for _ in range(steps):
    # A pause before each timed update: thread pools that spin after their
    # work (torch's OpenMP, Eigen) must not steal cores from the other.
    time.sleep(PAUSE_S if other is not None else 0.0)
    t0 = time.perf_counter()
    loss = run()
    times.append(time.perf_counter() - t0)
    if other is not None:
      time.sleep(PAUSE_S)
      t0 = time.perf_counter()
      other()
      other_times.append(time.perf_counter() - t0)
  return compile_s, times, loss, other_times, run


def profile_update(run, top, trace_dir):
  """Records one update with jax.profiler into `trace_dir` and prints the
  `top` events by total time (on a GPU: the kernels, from CUPTI; on the
  CPU: the thunks XLA traces), with their process (host or device)."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  with jax.profiler.trace(trace_dir):
    run()
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                    recursive=True)
  if not paths:
    print(f"no trace file under {trace_dir}")
    return
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  process = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  total, count = collections.Counter(), collections.Counter()
  for e in trace["traceEvents"]:
    # "$file:line function" events are the Python tracer's: left out.
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("$"):
      key = (process.get(e.get("pid"), "?"), e["name"])
      total[key] += e["dur"]
      count[key] += 1
  print(f"one update's trace ({trace_dir}), the {top} longest events:")
  for (proc, name), us in total.most_common(top):
    print(f"{us / 1e6:9.3f} s {count[(proc, name)]:6d}x  {proc[:24]:24} "
          f"{name[:90]}")


def device_peak_gib():
  """The device's peak memory in use so far (GiB), where the backend reports
  it (GPU, TPU: `memory_stats()["peak_bytes_in_use"]`); else None (CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depth", type=int, default=101)
  parser.add_argument("--crop", type=int, default=321)
  parser.add_argument("--batch", type=int, default=1,
                      help="images per domain")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--terms", default="all",
                      help=f"comma-separated of {sorted(TERMS)}")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--cpu_fixes", default="on", choices=("on", "off"))
  parser.add_argument("--cpu_kernels", default="on",
                      choices=("on", "off", "both"),
                      help="the model's XLA:CPU kernels (ASPP head and "
                      "weight gradients as matrix products); both: time "
                      "on, alternating with off")
  parser.add_argument("--one_pass", default="off",
                      choices=("on", "off", "both"),
                      help="config.train.domains_in_one_pass: source and "
                      "target as one batch (on) or two passes (off, the "
                      "default); both: time on, alternating with off")
  parser.add_argument("--host_memory", default="keep",
                      choices=("keep", "default"),
                      help="keep: glibc keeps freed memory for reuse, as "
                      "plca_jax.main sets it (plca_jax.xla."
                      "keep_freed_host_memory); default: glibc's own")
  parser.add_argument("--profile", type=int, default=0,
                      help="after timing, trace one more update of the "
                      "last term set and print this many of its longest "
                      "events (0: none)")
  parser.add_argument("--trace_dir", default="/tmp/plca_step_trace",
                      help="where --profile writes the trace")
  report.add_flag(parser)
  parser.add_argument("--torch", action="store_true",
                      help="alternate with the same update in PyTorch, "
                      "in a process of its own")
  args = parser.parse_args()
  if [args.one_pass == "both", args.cpu_kernels == "both",
      args.torch].count(True) > 1:
    parser.error("--one_pass=both, --cpu_kernels=both and --torch each "
                 "time against something else; give one of them")
  if args.host_memory == "keep":  # before the first use of a device
    xla.keep_freed_host_memory()
  print(f"R{args.depth}, {args.crop}x{args.crop}, {args.batch} image(s) per "
        f"domain, {args.dtype}, remat {args.remat}, XLA:CPU settings "
        f"{args.cpu_fixes}, XLA:CPU kernels {args.cpu_kernels}, domains in "
        f"one pass {args.one_pass}, host memory "
        f"{args.host_memory}, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores")
  header = (f"{'terms':>7} {'compile s':>10} {'median s':>9} {'min s':>7} "
            f"{'loss':>9}")
  against = ("two-pass" if args.one_pass == "both" else
             "no-kernels" if args.cpu_kernels == "both" else "torch")
  if args.torch or "both" in (args.one_pass, args.cpu_kernels):
    header += (f" {against + ' median s':>18} {against + ' min s':>15} "
               f"{'ratio':>6}")
  if device_peak_gib() is not None:
    # The process's peak so far: run one term set per process to read it
    # for that update alone.
    header += f" {'device peak GiB':>15}"
  print(header)
  md_rows = []
  for terms in args.terms.split(","):
    config = make_config(args, terms)
    other = None
    if args.one_pass == "both":
      two_pass = config.copy_and_resolve_references()
      two_pass.train.domains_in_one_pass = False
      other = build_update(two_pass, args.cpu_fixes == "on",
                           args.cpu_kernels != "off")[1]
    elif args.cpu_kernels == "both":
      other = build_update(config, args.cpu_fixes == "on", False)[1]
    elif args.torch:
      other = TorchWorker(args, config.model.num_classes, terms)
    compile_s, times, loss, other_times, run = time_update(
        config, args.steps, args.cpu_fixes == "on", other,
        args.cpu_kernels != "off")
    if isinstance(other, TorchWorker):
      other.close()
    line = (f"{terms:>7} {compile_s:10.1f} {statistics.median(times):9.2f} "
            f"{min(times):7.2f} {loss:9.4f}")
    if other_times:
      # Median of the per-round ratios: each pair ran back to back.
      ratio = statistics.median(a / b for a, b in zip(times, other_times))
      line += (f" {statistics.median(other_times):18.2f} "
               f"{min(other_times):15.2f} {ratio:6.2f}")
    if device_peak_gib() is not None:
      line += f" {device_peak_gib():15.2f}"
    print(line, flush=True)
    md_rows.append(line.split())
  report.emit(args, header.replace("device peak", "device_peak").replace(
      " median s", "_median_s").replace(" min s", "_min_s").split(),
              md_rows)
  if args.profile:
    profile_update(run, args.profile, args.trace_dir)


if __name__ == "__main__":
  main()
