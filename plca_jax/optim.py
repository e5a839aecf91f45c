"""Optimizers and learning-rate schedules the methods build on.

docs/method.md, Optimisation.

The segmentation network of every method trains with SGD + momentum, L2
weight decay added to the gradients, a poly learning rate with its own
horizon and a learning-rate multiplier on the head. Discriminators (e.g.
AdaptSegNet's) use Adam with the same poly decay.
"""

import flax
import jax.numpy as jnp
import optax

HEAD_PATTERN = "classifier"  # parameters the head LR multiplier applies to


def poly_schedule(base, horizon, power):
  """base * (1 - step / horizon)^power, 0 from the horizon on.

  Not `optax.polynomial_schedule`: under jit on CPU its 0.0 ** 0.9 at the
  horizon evaluates to NaN, which turns every parameter NaN in that update.
  """

  def schedule(step):
    frac = 1.0 - jnp.minimum(step, horizon) / horizon
    safe = jnp.where(frac > 0, frac, 1.0)
    return jnp.where(frac > 0, base * safe**power, 0.0)

  return schedule


def create_learning_rate_fn(config):
  """The segmentation network's poly schedule from `config.optim`."""
  return poly_schedule(config.optim.base_lr, config.optim.schedule_steps,
                       config.optim.poly_power)


def is_head(path):
  """True for parameter paths the head LR multiplier applies to."""
  return any(HEAD_PATTERN in str(key) for key in path)


def create_optimizer(config):
  """SGD + momentum, L2 decay added to gradients, head LR multiplier.

  Parameters whose path contains "classifier" (the ASPP heads, auxiliary
  ones included) get `config.optim.head_lr_mult` times the learning rate.
  """
  lr_fn = create_learning_rate_fn(config)

  def sgd(multiplier):
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(lambda step: multiplier * lr_fn(step),
                  momentum=config.optim.momentum))

  def labels(params):
    return flax.traverse_util.path_aware_map(
        lambda path, _: "head" if is_head(path) else "backbone", params)

  return optax.multi_transform(
      {"backbone": sgd(1.0), "head": sgd(config.optim.head_lr_mult)},
      labels)


def adam_poly(base_lr, horizon, power, b1, b2):
  """(Adam with a poly-decayed learning rate, its schedule)."""
  lr_fn = poly_schedule(base_lr, horizon, power)
  return optax.adam(lr_fn, b1=b1, b2=b2), lr_fn
