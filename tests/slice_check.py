"""Run with 32 host devices: the paper configs' update on 1-32 devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=32 \\
      python -m tests.slice_check

For each device count, resolves configs/synthia.py and configs/gta5.py
(plca_jax.schedule) and lowers synthia's sharded update for a mesh of that
many devices, with the paper's batch split but a tiny network and crop
(the split, not the network, is under test; gta5 splits the same way).
Prints one JSON object: {config: {devices: [micro-batches, batch, lowered
batch shape (synthia), steps, learning rate, Lovasz weight]}} (used by
schedule_test.py).
"""

import json

import jax
import jax.numpy as jnp

from configs import gta5
from configs import synthia
from plca_jax import methods
from plca_jax import schedule
from plca_jax import sharding
from plca_jax import train

COUNTS = (1, 2, 4, 8, 16, 32)


def lower(config, devices):
  """Lowers the update on a mesh of `devices`; the image batch's shape."""
  config.model.depth, config.model.width = 18, 4
  config.model.remat = "none"
  config.data.crop_size = (33, 33)
  mesh = sharding.create_mesh(devices)
  method = methods.get_method(config)
  state = jax.eval_shape(lambda: train.create_train_state(
      config, method, jax.random.key(0), mesh))
  k, b = config.train.grad_accum_steps, config.train.batch_size
  image = jax.ShapeDtypeStruct((k, b, 33, 33, 3), jnp.float32)
  label = jax.ShapeDtypeStruct((k, b, 33, 33), jnp.int32)
  batch = {d: {"image": image, "label": label} for d in ("source", "target")}
  step = train.create_train_step(config, method, mesh)
  lowered = step.lower(state, batch, train.step_key(config))
  text = lowered.as_text()
  assert f"{k}x{b}x33x33x3" in text, "batch shape missing"
  return [k, b, f"{k}x{b}x33x33x3"]


def main():
  devices = jax.devices()
  out = {}
  for module in (synthia, gta5):
    name = module.__name__.split(".")[-1]
    out[name] = {}
    for count in COUNTS:
      config, _ = schedule.resolve(module.get_config(), count)
      k, b = config.train.grad_accum_steps, config.train.batch_size
      shape = (lower(config, devices[:count]) if module is synthia else
               [k, b, None])
      out[name][count] = shape + [
          config.train.num_steps, config.optim.base_lr,
          config.loss.lovasz_weight]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
