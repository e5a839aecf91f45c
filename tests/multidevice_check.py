"""Run with 8 host devices: one update on 8 devices vs the same on 1.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m tests.multidevice_check

Prints one JSON object with the largest differences (used by
multidevice_test.py, which starts it in a subprocess because the device
count is fixed when JAX starts).
"""

import json
import re

import jax
import numpy as np

from configs import test as test_config
from plca_jax import methods
from plca_jax import sharding
from plca_jax import train
from plca_jax.data import input_pipeline


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float32) -
                                  np.asarray(y, np.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_rel_diff(a, b):
  return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def one_update(config, state, batch, devices):
  """(params, batch_stats, scalars, compiled-step HLO facts).

  The facts: the shapes of all all-gathers, the kinds of the other
  collectives that move data between devices, and the largest window of any
  reduce-window (a cumsum over a sharded axis becomes a reduce-window over
  the whole global axis: quadratic work, see losses.segmentation).
  """
  mesh = sharding.create_mesh(devices)
  state = jax.device_put(state, sharding.replicated(mesh))
  step = train.create_train_step(config, methods.get_method(config), mesh)
  batch = sharding.to_global(batch, mesh, 1)
  key = train.step_key(config)
  hlo = step.lower(state, batch, key).compile().as_text()
  gathers = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", hlo)
  exchanges = re.findall(r" (all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(", hlo)
  windows = [int(np.prod([int(d) for d in w.split("x")]))
             for w in re.findall(r"reduce-window\(.*?window=\{size=([\dx]+)",
                                 hlo)]
  new_state, scalars = step(state, batch, key)
  return jax.device_get((new_state.params, new_state.batch_stats,
                         scalars)) + ({"all_gathers": gathers,
                                       "exchanges": sorted(set(exchanges)),
                                       "max_window": max(windows, default=0)},)


def main():
  assert jax.device_count() == 8, jax.devices()
  config = test_config.get_config()
  config.train.batch_size = 8  # global: one image per device
  config.train.grad_accum_steps = 2
  mesh1 = sharding.create_mesh(jax.devices()[:1])
  state = jax.device_get(train.create_train_state(
      config, methods.get_method(config), jax.random.key(0), mesh1))
  batch, _ = train.next_update_batch(
      input_pipeline.create_train_iterator(config), 2)
  p1, s1, m1, _ = one_update(config, state, batch, jax.devices()[:1])
  p8, s8, m8, hlo = one_update(config, state, batch, jax.devices())
  bf16 = config.copy_and_resolve_references()
  bf16.train.compute_dtype = "bfloat16"
  pb, _, mb, _ = one_update(bf16, state, batch, jax.devices()[:1])
  print(json.dumps({
      "params": _max_diff(p1, p8),
      "param_change": _max_diff(p1, state.params),
      "batch_stats_rel": _max_rel_diff(s1, s8),
      "loss_1": float(m1["loss"]), "loss_8": float(m8["loss"]),
      "terms": {k: [float(m1[k]), float(m8[k])] for k in m1},
      "bf16_loss": float(mb["loss"]),
      "bf16_params": _max_diff(pb, p1),
      "bf16_finite": bool(all(np.all(np.isfinite(np.asarray(x, np.float32)))
                              for x in jax.tree.leaves(pb))),
      "bf16_param_dtype": str(jax.tree.leaves(pb)[0].dtype),
      "all_gathers": hlo["all_gathers"],
      "exchanges": hlo["exchanges"],
      "max_reduce_window": hlo["max_window"],
      "lovasz_pixels": config.train.batch_size * int(np.prod(
          config.data.crop_size)),
  }))


if __name__ == "__main__":
  main()
