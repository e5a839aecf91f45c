"""PLCA training: optimizer, train state, the jitted update, the loop.

One update (SPEC.md section 3) consumes `config.train.grad_accum_steps`
micro-batches of `config.train.batch_size` source and as many target images
(global). Per micro-batch, source and target go through the network as two
forward passes (per-domain BatchNorm statistics over the global batch), the
PLCA objective is evaluated, and gradients are averaged over micro-batches;
then SGD (momentum, L2 weight decay added to gradients,
poly learning rate with its own horizon, head LR multiplier) updates.
"""

import functools
import signal
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from plca_jax import checkpointing
from plca_jax import evaluate
from plca_jax import losses
from plca_jax import metrics as metrics_lib
from plca_jax import models
from plca_jax import sharding
from plca_jax import writers
from plca_jax import xla
from plca_jax.data import input_pipeline
from plca_jax.data import transforms

HEAD_PATTERN = "classifier"  # parameters the head LR multiplier applies to


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_learning_rate_fn(config):
  """Poly schedule base * (1 - step / horizon)^power, 0 from the horizon on.

  Not `optax.polynomial_schedule`: under jit on CPU its 0.0 ** 0.9 at the
  horizon evaluates to NaN, which turns every parameter NaN in that update.
  """
  base = config.optim.base_lr
  horizon = config.optim.schedule_steps
  power = config.optim.poly_power

  def schedule(step):
    frac = 1.0 - jnp.minimum(step, horizon) / horizon
    safe = jnp.where(frac > 0, frac, 1.0)
    return jnp.where(frac > 0, base * safe**power, 0.0)

  return schedule


def create_optimizer(config):
  """SGD + momentum, L2 decay added to gradients, head LR multiplier."""
  lr_fn = create_learning_rate_fn(config)

  def sgd(multiplier):
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay),
        optax.sgd(lambda step: multiplier * lr_fn(step),
                  momentum=config.optim.momentum))

  def labels(params):
    return flax.traverse_util.path_aware_map(
        lambda path, _: "head" if HEAD_PATTERN in path else "backbone",
        params)

  return optax.multi_transform(
      {"backbone": sgd(1.0), "head": sgd(config.optim.head_lr_mult)},
      labels)


def image_shape(config):
  return (1, *config.data.crop_size, 3)


def create_train_state(config, model, rng, mesh):
  """Initialises the train state straight onto the mesh.

  With `config.init_from`, its variables replace the initial ones (leaves
  matching `config.init_allow_missing` may keep their initial values).
  """
  tx = create_optimizer(config)
  replicated = sharding.replicated(mesh)

  def init(rng):
    variables = model.init(rng, jnp.zeros(image_shape(config)), train=False)
    return {"params": variables["params"],
            "batch_stats": variables["batch_stats"]}

  variables = jax.jit(init, out_shardings=replicated)(rng)
  if config.init_from:
    variables = jax.device_put(checkpointing.load_variables(
        config.init_from, variables, config.init_allow_missing), replicated)

  def build(variables):
    return TrainState.create(apply_fn=model.apply, tx=tx, **variables)

  return jax.jit(build, out_shardings=replicated)(variables)


def micro_batch_loss(params, batch_stats, micro, *, model, config):
  """Loss of one micro-batch: (total, (terms, new batch_stats)).

  `micro` is {"source": {"image", "label"}, "target": {...}} with uint8
  images (N, H, W, 3); the parameters are what gradients are taken of.
  """
  images = [transforms.encode(micro[d]["image"], config.data.encoding)
            for d in ("source", "target")]
  out_s, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, images[0], train=True,
      mutable=["batch_stats"])
  out_t, updates = model.apply(
      {"params": params, "batch_stats": updates["batch_stats"]}, images[1],
      train=True, mutable=["batch_stats"])
  labels = micro["source"]["label"].astype(jnp.int32)
  # Target labels, when the config loads them (synthetic data, analysis),
  # feed only the "*_correct" association statistics, never a loss.
  target_labels = (micro["target"]["label"].astype(jnp.int32)
                   if config.data.target.require_labels else None)
  total, terms = losses.total_loss(config, out_s, out_t, labels,
                                   target_labels)
  if _pseudo_pairing(config):
    terms["target_classes"] = jax.lax.stop_gradient(predicted_class_sets(
        out_t["logits"], config.data.pairing_min_share))
  return total, (terms, updates["batch_stats"])


def _pseudo_pairing(config):
  return (config.data.pairing == "class_overlap" and
          config.data.pairing_target_classes == "pseudo")


def predicted_class_sets(logits, min_share):
  """(N, M) bool: the classes predicted on >= `min_share` of each grid."""
  pred = jnp.argmax(logits, axis=-1).reshape(logits.shape[0], -1)
  share = jnp.mean(jax.nn.one_hot(pred, logits.shape[-1], dtype=jnp.float32),
                   axis=1)
  return share >= min_share


def train_step(state, batch, *, model, config):
  """One optimizer update over K stacked micro-batches.

  Args:
    state: TrainState.
    batch: {"source": {"image": uint8 (K, B, H, W, 3), "label": (K, B, H,
      W)}, "target": {"image": ...}} with B the global batch.

  Returns:
    (new state, dict of scalar metrics averaged over the micro-batches;
    with class-overlap pairing on pseudo-labels also "target_classes", the
    (K, B, M) predicted class sets of the target images).
  """
  grad_fn = jax.value_and_grad(
      functools.partial(micro_batch_loss, model=model, config=config),
      has_aux=True)
  # A Python loop over the K (static, small) micro-batches: on XLA:CPU a
  # lax.scan, even unrolled, made the demo's update 3x slower (1.42 s vs
  # 0.46 s). Gradients are summed as they come; BatchNorm statistics thread
  # through the micro-batches in order.
  k = batch["source"]["image"].shape[0]
  grads, batch_stats, terms = None, state.batch_stats, []
  for i in range(k):
    micro = {d: {key: batch[d][key][i] for key in ("image", "label")}
             for d in ("source", "target")}
    (loss, (micro_terms, batch_stats)), micro_grads = grad_fn(
        state.params, batch_stats, micro)
    grads = micro_grads if grads is None else jax.tree.map(
        jnp.add, grads, micro_grads)
    terms.append({"loss": loss, **micro_terms})
  grads = jax.tree.map(lambda g: g / k, grads)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  classes = [t.pop("target_classes") for t in terms if "target_classes" in t]
  scalars = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *terms)
  scalars["grad_norm"] = optax.tree.norm(grads)
  if classes:  # (K, B, M): for the host's class-overlap pairing table
    scalars["target_classes"] = jnp.stack(classes)
  return new_state, scalars


def create_train_step(config, model, mesh, compiler_options=None):
  """The jitted, sharded update `(state, batch) -> (state, scalars)`.

  The state is replicated and donated, the batch sharded on its batch axis
  (axis 1: K micro-batches x global batch); backend-specific compiler
  options come from `plca_jax.xla` unless `compiler_options` is given.
  Main and the benchmarks use this one function.
  """
  if compiler_options is None:
    compiler_options = xla.compiler_options()
  replicated = sharding.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, model=model, config=config),
      in_shardings=(replicated, sharding.batch_sharding(mesh, 1)),
      out_shardings=(replicated, replicated), donate_argnums=(0,),
      compiler_options=compiler_options)


def is_finite(state):
  """True if every parameter is finite (one scalar reduction)."""
  return bool(jnp.isfinite(optax.tree.norm(state.params)))


def next_update_batch(iterator, steps):
  """Stacks `steps` micro-batches: leaves (K, B_local, ...); names dropped.

  With class-overlap pairing the result also has "pairing" (host-side
  statistics of the choice; not an input of the train step).
  """
  micro = [next(iterator) for _ in range(steps)]
  skipped = sum(int(np.sum(m[d]["skipped"])) for m in micro
                for d in ("source", "target"))
  stacked = {d: {key: np.stack([m[d][key] for m in micro])
                 for key in ("image", "label")}
             for d in ("source", "target")}
  if "pairing" in micro[0]:  # class-overlap pairing: host-side statistics
    stacked["pairing"] = {key: np.stack([m["pairing"][key] for m in micro])
                          for key in micro[0]["pairing"]}
  return stacked, skipped


class _Preemption:
  """Turns SIGTERM (Cloud TPU preemption) into a flag the loop checks.

  Single-process runs only: after `jax.distributed.initialize`, JAX's own
  preemption notifier handles SIGTERM and orbax's `reached_preemption`
  brings every process to the same step; a Python handler would replace it.
  """

  def __init__(self, install=True):
    self.requested = False
    self._previous = None
    if install:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Signal %d received: checkpointing and exiting.", signum)
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _observe_pairing(train_iter, scalars, info, process_index,
                     process_count):
  """Feeds this process's predicted target classes back to the pairing;
  adds the pairing statistics (means over the local batch) to `scalars`."""
  scalars = dict(scalars)
  classes = scalars.pop("target_classes", None)
  if classes is not None:
    classes = np.asarray(classes)  # (K, B_global, M), replicated
    local = classes.shape[1] // process_count
    classes = classes[:, process_index * local:(process_index + 1) * local]
    train_iter.observe(classes.reshape(-1, classes.shape[-1]))
  else:
    train_iter.observe(np.zeros((info["shared"].size,
                                 train_iter.num_classes), bool))
  scalars["pairing_shared_classes"] = float(np.mean(info["shared"]))
  scalars["pairing_known_targets"] = float(np.mean(info["known"]))
  return scalars


def _hparams(config):
  """Config flattened to {"a/b": scalar} for the hparams summary."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep="/")
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in flat.items()}


def _write_train_metrics(writer, step, collection, skipped, lr_fn):
  """Computes the merged metrics (one host sync), checks, writes."""
  values = {f"train/{k}": float(v) for k, v in collection.compute().items()}
  if not np.isfinite(values["train/loss"]):
    raise FloatingPointError(
        f"non-finite loss {values['train/loss']} in the steps up to {step}; "
        "stopping. The last checkpoint (before these steps) is intact.")
  values["train/learning_rate"] = float(lr_fn(step - 1))
  values["train/skipped_files"] = skipped
  writer.write_scalars(step, values)


def _checkpoint(manager, step, state, iterator):
  if not is_finite(state):
    raise FloatingPointError(
        f"non-finite parameters at step {step}; not saving. The last "
        "checkpoint is intact.")
  checkpointing.save(manager, step, state, iterator)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, evaluate_during_training=True):
  """Trains (resuming from WORKDIR/checkpoints) and evaluates; returns state."""
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = sharding.create_mesh()
  sharding.check_batch_divides(config.train.batch_size, mesh)
  writer = writers.create_writer(workdir, process_index)
  model = models.get_model(config)

  # Data.
  train_iter = input_pipeline.create_train_iterator(config, process_index,
                                                    process_count)

  # Model and optimizer: resume, else init_from, else scratch.
  manager = checkpointing.create_manager(workdir,
                                         config.train.keep_checkpoints)
  rng = jax.random.key(config.seed)
  latest = manager.latest_step()
  if latest is not None:  # the checkpoint replaces any init_from
    config = config.copy_and_resolve_references()
    config.init_from = ""
  state = create_train_state(config, model, rng, mesh)
  if latest is not None:
    logging.info("Resuming from %s step %d", manager.directory, latest)
    state = checkpointing.restore(manager, latest, state, train_iter)
  start_step = int(state.step)
  if start_step == 0:
    writer.write_hparams(_hparams(config))

  # The jitted update.
  step_fn = create_train_step(config, model, mesh)
  eval_step_fn = evaluate.create_eval_step(config, model, mesh)
  lr_fn = create_learning_rate_fn(config)
  num_steps = config.train.num_steps
  hooks = []
  report = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=writer,
      every_steps=config.train.log_every)
  if process_index == 0:
    hooks.append(report)
  preemption = _Preemption(install=process_count == 1)

  # The loop.
  collection, skipped = None, 0
  logging.info("Training steps %d..%d", start_step + 1, num_steps)
  try:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch, n_skipped = next_update_batch(train_iter,
                                             config.train.grad_accum_steps)
        pairing_info = batch.pop("pairing", None)
        state, scalars = step_fn(state, sharding.to_global(batch, mesh, 1))
      skipped += n_skipped
      if pairing_info is not None:
        scalars = _observe_pairing(train_iter, scalars, pairing_info,
                                   process_index, process_count)
      if collection is None:
        collection_cls = metrics_lib.train_collection(sorted(scalars))
      update = collection_cls.single_from_model_output(**scalars)
      collection = update if collection is None else collection.merge(update)
      logging.log_first_n(logging.INFO, "Finished step %d.", 3, step)
      for hook in hooks:
        hook(step)
      last = step == num_steps
      if step % config.train.log_every == 0 or last:
        _write_train_metrics(writer, step, collection, skipped, lr_fn)
        collection, skipped = None, 0
      stop = preemption.requested or manager.reached_preemption(step)
      if step % config.train.checkpoint_every == 0 or last or stop:
        with report.timed("checkpoint"):
          _checkpoint(manager, step, state, train_iter)
      if stop:
        manager.wait_until_finished()
        logging.warning("Stopped at step %d for preemption.", step)
        return state
      if evaluate_during_training and (
          step % config.train.eval_every == 0 or last):
        with report.timed("eval"):
          evaluate.evaluate_and_write(
              config, model, {"params": state.params,
                              "batch_stats": state.batch_stats},
              mesh, writer, step, eval_step_fn)
  finally:
    preemption.restore()
    manager.wait_until_finished()
    writer.flush()
  return state
