r"""Seconds per optimizer update of the full model, compile time apart.

Builds the update exactly as training does (`train.create_train_step`) for
configs/synthia.py overridden by the flags, feeds it one fixed random batch
and times `--steps` updates after a warm-up update. `--terms` gives a
per-term breakdown, each a separate compile:
  ce       cross-entropy only
  lovasz   + Lovasz-softmax
  lsr      + LSR on both domains
  all      + L_fass + L_cass (the full PLCA objective)
`--cpu_fixes=off` drops the XLA:CPU settings of plca_jax.xla (Eigen
convolutions, materialised block outputs) to show what they change.

    python benchmarks/step.py                        # R101, 321x321, all
    python benchmarks/step.py --terms=ce,lovasz,lsr,all --remat=block
    python benchmarks/step.py --depth=18 --crop=730 --dtype=bfloat16
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import synthia
from plca_jax import methods
from plca_jax import sharding
from plca_jax import train

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


def time_update(config, steps, cpu_fixes):
  mesh = sharding.create_mesh(jax.devices()[:1])
  method = methods.get_method(config)
  options = None
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
  state, scalars = compiled(state, batch, key)  # warm-up
  jax.block_until_ready(scalars)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, scalars = compiled(state, batch, key)
    jax.block_until_ready(scalars)
    times.append(time.perf_counter() - t0)
  return compile_s, times, float(scalars["loss"])


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
  args = parser.parse_args()
  print(f"R{args.depth}, {args.crop}x{args.crop}, {args.batch} image(s) per "
        f"domain, {args.dtype}, remat {args.remat}, XLA:CPU settings "
        f"{args.cpu_fixes}, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}), {os.cpu_count()} CPU cores")
  print(f"{'terms':>7} {'compile s':>10} {'median s':>9} {'min s':>7} "
        f"{'loss':>9}")
  for terms in args.terms.split(","):
    config = make_config(args, terms)
    compile_s, times, loss = time_update(config, args.steps,
                                         args.cpu_fixes == "on")
    print(f"{terms:>7} {compile_s:10.1f} {statistics.median(times):9.2f} "
          f"{min(times):7.2f} {loss:9.4f}", flush=True)


if __name__ == "__main__":
  main()
