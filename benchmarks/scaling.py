r"""Throughput of the full PLCA update on 1, 2, 4, 8 CPU host devices.

Each device count runs in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N, the demo model
(DeepLab-V2 ResNet-18, width 16, 96x160 crops, every PLCA term on) and a
fixed per-device batch (default 2 source + 2 target images), so the global
batch grows with the device count. Prints images per second (source and
target images both counted) and the scaling efficiency against 1 device.

    python benchmarks/scaling.py [--devices=1,2,4,8] [--per_device_batch=2]

On this CPU the "devices" are slices of the same 2 cores: the table shows
the overhead of sharding, collectives and the global Lovasz sort, not a
speed-up; on TPU/GPU each device is real hardware.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
# pylint: enable=g-import-not-at-top,wrong-import-position


def run_one(per_device_batch, steps):
  """Times the jitted update with all visible devices; returns a dict."""
  sys.path.insert(0, REPO)
  # pylint: disable=g-import-not-at-top
  import jax
  from configs import demo
  from plca_jax import methods
  from plca_jax import sharding
  from plca_jax import train
  from plca_jax.data import input_pipeline

  devices = jax.device_count()
  config = demo.get_config()
  config.train.batch_size = per_device_batch * devices
  mesh = sharding.create_mesh()
  method = methods.get_method(config)
  state = train.create_train_state(config, method, jax.random.key(0), mesh)
  batch, _ = train.next_update_batch(
      input_pipeline.create_train_iterator(config), 1)
  batch = sharding.to_global(batch, mesh, 1)
  step = train.create_train_step(config, method, mesh)
  key = train.step_key(config)
  t0 = time.perf_counter()
  state, scalars = step(state, batch, key)
  jax.block_until_ready(scalars)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, scalars = step(state, batch, key)
  jax.block_until_ready(scalars)
  step_s = (time.perf_counter() - t0) / steps
  return {"devices": devices, "global_batch": config.train.batch_size,
          "step_s": step_s, "compile_s": compile_s,
          "images_per_s": 2 * config.train.batch_size / step_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--per_device_batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10)
  report.add_flag(parser)
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(run_one(args.per_device_batch, args.steps)))
    return
  rows = []
  for n in (int(d) for d in args.devices.split(",")):
    env = {**os.environ, "XLA_FLAGS": (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={n}").strip()}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker",
         f"--per_device_batch={args.per_device_batch}",
         f"--steps={args.steps}"], env=env, capture_output=True, text=True,
        check=False)
    if proc.returncode != 0:
      sys.exit(f"{n} devices failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  print(f"full update (demo model, {args.per_device_batch} source + "
        f"{args.per_device_batch} target images per device), "
        f"{os.cpu_count()} CPU cores")
  print(f"{'devices':>8} {'global batch':>13} {'step s':>8} {'images/s':>9} "
        f"{'efficiency':>11} {'compile s':>10}")
  base = rows[0]["images_per_s"] / rows[0]["devices"]
  report.emit(args, ("devices", "global batch", "step s", "images/s",
                     "efficiency", "compile s"),
              [(r["devices"], r["global_batch"], f"{r['step_s']:.3f}",
                f"{r['images_per_s']:.2f}",
                f"{r['images_per_s'] / (base * r['devices']):.2f}",
                f"{r['compile_s']:.1f}") for r in rows])
  for r in rows:
    efficiency = r["images_per_s"] / (base * r["devices"])
    print(f"{r['devices']:>8} {r['global_batch']:>13} {r['step_s']:8.3f} "
          f"{r['images_per_s']:9.2f} {efficiency:11.2f} "
          f"{r['compile_s']:10.1f}")


if __name__ == "__main__":
  main()
