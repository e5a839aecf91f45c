r"""Device memory of the update and of evaluation, read without running them.

For a config (default configs/synthia.py: DeepLab-V2 R101, every PLCA term)
prints, at 730x730 crops:
- "saved for backward": the bytes of the residuals of `jax.vjp` of one
  micro-batch's loss with respect to the parameters (what the forward pass
  keeps alive for the backward pass; parameters included), from
  `jax.eval_shape` alone: backend-independent, nothing is computed;
- "XLA temp": the temporary buffers of the compiled update
  (`compiled.memory_analysis()`; compiles for this backend. On XLA:CPU this
  does not show what rematerialisation saves: the CPU scheduler runs the
  recomputations early. On GPU/TPU it is the figure that matters);
for 1 and 2 images per domain, float32 and bfloat16, remat none and block
(`--remats=none,block,block_keep_3x3` adds the third mode);
the same two figures for the evaluation step at 730x1460 with test-time
aggregation; and, from the saved-for-backward figure, the largest
micro-batch per domain that fits 16, 32 and 80 GiB of device memory
(parameters, optimizer state, gradients and batch stats counted once, plus
the saved activations growing linearly with the batch; the temporaries of
the backward pass of one block come on top and are small beside them).

    python benchmarks/memory.py                       # configs/synthia.py
    python benchmarks/memory.py --config=configs/gta5.py --no_compile
"""

import argparse
import functools
import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax import evaluate
from plca_jax import methods
from plca_jax import models
from plca_jax import sharding
from plca_jax import train
from plca_jax.methods import plca

GIB = 2**30


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _bytes(tree):
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _variant(config, crop, batch, dtype, remat):
  config = config.copy_and_resolve_references()
  config.data.crop_size = crop
  config.train.batch_size = batch
  config.train.grad_accum_steps = 1
  config.train.compute_dtype = dtype
  config.model.remat = remat
  return config


def _abstract_batch(config, k=None):
  n = config.train.batch_size
  h, w = config.data.crop_size
  lead = (n,) if k is None else (k, n)
  domain = {"image": jax.ShapeDtypeStruct(lead + (h, w, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct(lead + (h, w), jnp.uint8)}
  return {"source": domain, "target": dict(domain)}


def _abstract_variables(config, model):
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0),
                        jnp.zeros(train.image_shape(config)))


def saved_for_backward(config):
  """Bytes of the residuals of one micro-batch's loss w.r.t. the params."""
  model = models.get_model(config)
  variables = _abstract_variables(config, model)
  micro = _abstract_batch(config)

  def residuals(params, batch_stats, micro):
    loss = lambda p: plca.micro_batch_loss(  # pylint: disable=g-long-lambda
        p, batch_stats, micro, model=model, config=config)[0]
    return jax.vjp(loss, params)[1]

  saved = jax.eval_shape(residuals, variables["params"],
                         variables["batch_stats"], micro)
  return _bytes(saved), _bytes(variables["params"])


def update_temp(config):
  """XLA temporary buffers of the compiled update (bytes)."""
  mesh = sharding.create_mesh(jax.devices()[:1])
  method = methods.get_method(config)
  state = jax.eval_shape(lambda: train.create_train_state(
      config, method, jax.random.key(0), mesh))
  step = train.create_train_step(config, method, mesh)
  compiled = step.lower(state, _abstract_batch(config, k=1),
                        train.step_key(config)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def eval_temp(config):
  """XLA temporary buffers of the compiled evaluation step (bytes)."""
  model = models.get_model(config)
  variables = _abstract_variables(config, model)
  h, w = config.data.eval_image_size
  lh, lw = config.data.eval_label_size
  n = 1
  batch = {"image": jax.ShapeDtypeStruct((n, h, w, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((n, lh, lw), jnp.int32),
           "mask": jax.ShapeDtypeStruct((n,), jnp.bool_)}
  step = jax.jit(functools.partial(evaluate.eval_step, model=model,
                                   config=config))
  return step.lower(dict(variables), batch).compile().memory_analysis(
  ).temp_size_in_bytes


def fits(saved_1, saved_2, params_bytes, budget):
  """Largest batch b with fixed + b * per_image <= budget (0 if none)."""
  per_image = saved_2 - saved_1
  fixed = saved_1 - per_image + 4 * params_bytes  # params, momentum, grads,
  # and the new params of the update
  return max(0, int((budget - fixed) // per_image)) if per_image > 0 else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs",
                                                       "synthia.py"))
  parser.add_argument("--crop", type=int, default=730)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--remats", default="none,block")
  report.add_flag(parser)
  parser.add_argument("--no_compile", action="store_true",
                      help="skip the XLA temporary-buffer figures")
  args = parser.parse_args()
  base = load_config(args.config)
  crop = (args.crop, args.crop)
  print(f"{os.path.relpath(args.config, REPO)}: R{base.model.depth}, "
        f"{base.model.num_classes} classes, {args.crop}x{args.crop} crops, "
        f"backend {jax.default_backend()}")
  print(f"{'dtype':>9} {'remat':>14} {'img/domain':>10} "
        f"{'saved for bwd GiB':>18} {'XLA temp GiB':>13}")
  fit_rows, md_rows = [], []
  for dtype in args.dtypes.split(","):
    for remat in args.remats.split(","):
      saved = {}
      for batch in (1, 2):
        config = _variant(base, crop, batch, dtype, remat)
        t0 = time.perf_counter()
        saved[batch], params_bytes = saved_for_backward(config)
        temp = float("nan") if args.no_compile else update_temp(config) / GIB
        print(f"{dtype:>9} {remat:>14} {batch:>10} {saved[batch] / GIB:18.2f} "
              f"{temp:13.2f}   ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        md_rows.append((dtype, remat, batch, f"{saved[batch] / GIB:.2f}",
                        "-" if args.no_compile else f"{temp:.2f}"))
      fit_rows.append((dtype, remat, [fits(saved[1], saved[2], params_bytes,
                                           g * GIB) for g in (16, 32, 80)]))
  print("largest micro-batch per domain that fits (from saved for backward):")
  print(f"{'dtype':>9} {'remat':>14} {'16 GiB':>7} {'32 GiB':>7} {'80 GiB':>7}")
  for dtype, remat, counts in fit_rows:
    print(f"{dtype:>9} {remat:>14} " + " ".join(f"{c:>7}" for c in counts))
  report.emit(args, ("compute dtype", "remat", "images / domain",
                     "saved for backward GiB", "XLA temporaries GiB"),
              md_rows)
  report.emit(args, ("compute dtype", "remat",
                     "largest micro-batch per domain in 16 / 32 / 80 GiB"),
              [(d, r, " / ".join(map(str, c))) for d, r, c in fit_rows])
  if not args.no_compile:
    for dtype in args.dtypes.split(","):
      config = _variant(base, crop, 1, dtype, "none")
      h, w = config.data.eval_image_size
      print(f"evaluation step, {h}x{w}, 1 image, test-time aggregation "
            f"{config.eval.aggregate}, {dtype}: XLA temp "
            f"{eval_temp(config) / GIB:.2f} GiB")


if __name__ == "__main__":
  main()
