"""Training for every method: train state, the jitted update, the loop.

One update (docs/method.md, Optimisation) consumes
`config.train.grad_accum_steps` micro-batches of `config.train.batch_size`
source and as many target images (global). The method (`config.method`,
`plca_jax.methods`) gives, per micro-batch, the gradients of each of its parameter trees (PLCA: source
and target as two forward passes, per-domain BatchNorm statistics over the
global batch, the PLCA objective); they are averaged over micro-batches and
each tree's optimizer updates it (the segmentation network: SGD with
momentum, L2 weight decay added to gradients, poly learning rate with its
own horizon, head LR multiplier; `plca_jax.optim`).
"""

import functools
import signal
import time
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from plca_jax import checkpointing
from plca_jax import console
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import metrics as metrics_lib
from plca_jax import schedule
from plca_jax import sharding
from plca_jax import xla
from plca_jax.data import input_pipeline
from plca_jax.methods import base

TRAIN_KEY_STREAM = 1  # step_key: fold_in(key(seed), 1); init uses key(seed)

class TrainState(train_state.TrainState):
  """The segmentation network's state; `extra` holds the method's other
  networks, {tree name: TrainState} (empty for PLCA)."""
  batch_stats: Any
  extra: Any = flax.struct.field(default_factory=dict)


def image_shape(config):
  return (1, *config.data.crop_size, 3)


def create_train_state(config, method, rng, mesh):
  """Initialises the train state of every tree of `method` onto the mesh.

  The segmentation network initialises from `rng`, the k-th other network
  (k = 1, 2, ...) from `fold_in(rng, k)`. With `config.init_from`, its
  variables replace the segmentation network's initial ones (leaves
  matching `config.init_allow_missing` may keep their initial values).
  """
  if config.init_from:
    checkpointing.check_init_expectations(config)
  replicated = sharding.replicated(mesh)
  networks = {base.SEGMENTATION: (method.model, (jnp.zeros(image_shape(
      config)),)), **method.extra_networks()}

  def init(rng):
    out = {}
    for k, (name, (module, inputs)) in enumerate(networks.items()):
      key = rng if k == 0 else jax.random.fold_in(rng, k)
      variables = module.init(key, *inputs, train=False)
      out[name] = {"params": variables["params"],
                   "batch_stats": variables.get("batch_stats", {})}
    return out

  variables = jax.jit(xla.traced_for(mesh, init),
                      out_shardings=replicated)(rng)
  if config.init_from:
    variables[base.SEGMENTATION] = jax.device_put(
        checkpointing.load_variables(config.init_from,
                                     variables[base.SEGMENTATION],
                                     config.init_allow_missing), replicated)

  def build(variables):
    states = {name: TrainState.create(
        apply_fn=networks[name][0].apply, tx=method.create_optimizer(name),
        **variables[name]) for name in networks}
    return states.pop(base.SEGMENTATION).replace(extra=states)

  return jax.jit(build, out_shardings=replicated)(variables)


def train_step(state, batch, rng, phase=0, *, method):
  """One optimizer update of every tree the method trains in `phase`, over
  K stacked micro-batches.

  Args:
    state: TrainState.
    batch: {domain: {field: (K, B, ...)}} with B the global batch and the
      method's `batch_fields`.
    rng: a key; micro-batch i of the update at step s gets
      `fold_in(fold_in(rng, s), i)`, so a resumed run draws the same numbers.
    phase: `method.phase_of(step)` (static; 0 for single-phase methods).

  Returns:
    (new state, dict of scalar metrics averaged over the micro-batches, plus
    "grad_norm" (and "<tree>_grad_norm" per other tree; 0 for a tree not
    trained in this phase); with class-overlap
    pairing on pseudo-labels also "target_classes", the (K, B, M) predicted
    class sets of the target images).
  """
  trees = {base.SEGMENTATION: state, **state.extra}
  rng = jax.random.fold_in(rng, state.step)
  k = jax.tree.leaves(batch)[0].shape[0]
  stats = {n: t.batch_stats for n, t in trees.items()}

  def micro_step(stats, micro, i):
    variables = {n: {"params": t.params, "batch_stats": stats[n]}
                 for n, t in trees.items()}
    grads, new_stats, scalars = method.micro_batch_grads(
        variables, micro, jax.random.fold_in(rng, i), state.step, phase)
    return grads, {**stats, **new_stats}, scalars

  # Gradients are summed as they come; BatchNorm statistics thread through
  # the micro-batches in order.
  if not _scan_micro(method.config, k):
    grads, terms = None, []
    for i in range(k):
      micro_grads, stats, scalars = micro_step(
          stats, jax.tree.map(lambda x, i=i: x[i], batch), i)
      grads = micro_grads if grads is None else jax.tree.map(
          jnp.add, grads, micro_grads)
      terms.append(scalars)
  else:
    grads, stats, terms = _scan_micro_batches(micro_step, stats, batch, k)
  grads = jax.tree.map(lambda g: g / k, grads)
  # Every tree's `step` counts updates (the run's position); a tree not
  # trained in this phase keeps its parameters and optimizer state.
  new = {n: (t.apply_gradients(grads=grads[n], batch_stats=stats[n])
             if n in grads else
             t.replace(step=t.step + 1, batch_stats=stats[n]))
         for n, t in trees.items()}
  # Trees moved otherwise than by gradients (e.g. DACS's EMA teacher).
  new = method.after_update(new, state.step)
  new_state = new.pop(base.SEGMENTATION).replace(extra=new)
  if isinstance(terms, list):  # the Python loop's; the scan's are stacked
    terms = jax.tree.map(lambda *x: jnp.stack(x), *terms)
  classes = terms.pop("target_classes", None)
  scalars = jax.tree.map(lambda x: jnp.mean(x, axis=0), terms)
  for name in trees:
    key = ("" if name == base.SEGMENTATION else f"{name}_") + "grad_norm"
    scalars[key] = (optax.tree.norm(grads[name]) if name in grads else
                    jnp.zeros([], jnp.float32))
  if classes is not None:  # (K, B, M): for the host's pairing table
    scalars["target_classes"] = classes
  return new_state, scalars


MICRO_BATCH_LOOPS = ("auto", "loop", "scan")


def _scan_micro(config, k):
  """Whether an update of `k` micro-batches runs them as a lax.scan
  (`config.train.micro_batch_loop`; "auto": in TPU and GPU programs, where
  it puts one copy of the forward and backward pass in the program instead
  of K, while XLA:CPU ran the demo's update 3x slower as a scan)."""
  mode = config.train.get("micro_batch_loop", "auto")
  if mode not in MICRO_BATCH_LOOPS:
    raise ValueError(f"config.train.micro_batch_loop={mode!r}; expected one "
                     f"of {MICRO_BATCH_LOOPS}")
  if k == 1 or mode == "loop":
    return False
  return mode == "scan" or not xla.on_cpu()


def _scan_micro_batches(micro_step, stats, batch, k):
  """K micro-batches as a lax.scan of `micro_step(stats, micro, i) ->
  (grads, stats, scalars)`: (summed grads, last stats, stacked scalars)."""
  first = jax.tree.map(lambda x: x[0], batch)
  shapes = jax.eval_shape(lambda: micro_step(stats, first, 0)[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(carry, xs):
    grads, stats = carry
    micro, i = xs
    micro_grads, stats, scalars = micro_step(stats, micro, i)
    return (jax.tree.map(jnp.add, grads, micro_grads), stats), scalars

  (grads, stats), terms = jax.lax.scan(body, (zeros, stats),
                                       (batch, jnp.arange(k)))
  return grads, stats, terms


def create_train_step(config, method, mesh, compiler_options=None):
  """The jitted, sharded update `(state, batch, rng, phase=0) -> (state,
  scalars)`.

  The state and key are replicated, the state donated, the batch sharded
  on its batch axis (axis 1: K micro-batches x global batch); `phase`
  (positional, `method.phase_of(step)`) is static: one program per phase;
  the program is traced for the mesh's platform (`xla.building_for`: the
  model's forms, the Lovasz sort) and compiled with that platform's options
  unless `compiler_options` is given. Main, plca_jax.aot, the benchmarks
  and the tests use this one function.
  """
  del config  # the method holds it
  if compiler_options is None:
    compiler_options = xla.compiler_options(xla.platform_of(mesh))
  replicated = sharding.replicated(mesh)
  return jax.jit(
      xla.traced_for(mesh, functools.partial(train_step, method=method)),
      in_shardings=(replicated, sharding.batch_sharding(mesh, 1),
                    replicated),
      out_shardings=(replicated, replicated), donate_argnums=(0,),
      static_argnums=(3,), compiler_options=compiler_options)


def step_key(config):
  """The key `train_step` folds the step into (derived from the seed)."""
  return jax.random.fold_in(jax.random.key(config.seed), TRAIN_KEY_STREAM)


def network_variables(state):
  """{tree: {"params", "batch_stats"}} of every network in `state`."""
  return {base.SEGMENTATION: {"params": state.params,
                              "batch_stats": state.batch_stats},
          **{name: {"params": t.params, "batch_stats": t.batch_stats}
             for name, t in state.extra.items()}}


@jax.jit
def _all_finite(trees):
  return jnp.isfinite(optax.tree.norm(trees))


def is_finite(state):
  """True if every parameter of every tree is finite (one program).

  Jitted: run op by op, the norm compiled a program per distinct leaf
  shape and operation before each run's first checkpoint (185 programs
  for LDR's trees).
  """
  trees = [state.params] + [t.params for t in state.extra.values()]
  return bool(_all_finite(trees))


DEFAULT_FIELDS = {d: ("image", "label") for d in base.DOMAINS}


def next_update_batch(iterator, steps, fields=None):
  """Stacks `steps` micro-batches: leaves (K, B_local, ...).

  Only `fields` ({domain: names}, a method's `batch_fields`; image and
  label by default) are kept. With class-overlap pairing the result also
  has "pairing" (host-side statistics of the choice; not an input of the
  train step).
  """
  fields = DEFAULT_FIELDS if fields is None else fields
  micro = [next(iterator) for _ in range(steps)]
  skipped = sum(int(np.sum(m[d]["skipped"])) for m in micro
                for d in base.DOMAINS)
  stacked = {d: {key: np.stack([m[d][key] for m in micro])
                 for key in fields[d]}
             for d in base.DOMAINS}
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


def _gather_micro(local, process_count):
  """(K, b, ...) per process -> (K, P*b, ...): the global batch's rows in
  the order of the global arrays (process p's rows at [p*b, (p+1)*b))."""
  local = np.asarray(local)
  if process_count == 1:
    return local
  every = np.asarray(multihost_utils.process_allgather(local))  # (P, K, b..)
  every = np.moveaxis(every, 0, 1)  # (K, P, b, ...)
  return every.reshape(every.shape[0], -1, *every.shape[3:])


def _observe_pairing(train_iter, scalars, info, process_count):
  """Feeds the global batch's predicted target classes back to the pairing
  table (the same on every process); adds the pairing statistics (means over
  the global batch) to `scalars`."""
  scalars = dict(scalars)
  classes = scalars.pop("target_classes", None)
  shape = info["shared"].shape  # (K, b): this process's rows
  indices = _gather_micro(train_iter.pending().reshape(shape), process_count)
  shared = _gather_micro(info["shared"], process_count)
  known = _gather_micro(info["known"], process_count)
  if classes is not None:
    classes = np.asarray(classes)  # (K, B_global, M), replicated
  else:
    classes = np.zeros((*indices.shape, train_iter.num_classes), bool)
  train_iter.observe(classes.reshape(-1, classes.shape[-1]),
                     indices.reshape(-1))
  scalars["pairing_shared_classes"] = float(np.mean(shared))
  scalars["pairing_known_targets"] = float(np.mean(known))
  return scalars


def _hparams(config):
  """Config flattened to {"a/b": scalar} for the hparams summary."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep="/")
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in flat.items()}


def _write_train_metrics(writer, step, collection, skipped, method):
  """Computes the merged metrics (one host sync), checks, writes."""
  values = {f"train/{k}": float(v) for k, v in collection.compute().items()}
  # The loss first, then any other scalar (e.g. a discriminator's loss).
  bad = [k for k in ["train/loss", *values] if not np.isfinite(values[k])]
  if bad:
    name = bad[0].removeprefix("train/")
    raise FloatingPointError(
        f"non-finite {name} {values[bad[0]]} in the steps up to {step}; "
        "stopping. The last checkpoint (before these steps) is intact.")
  for name, lr in method.learning_rates(step - 1).items():
    values[f"train/{name}"] = float(lr)
  if jax.process_count() > 1:  # every process's, as one process would count
    skipped = np.sum(multihost_utils.process_allgather(np.int64(skipped)))
  values["train/skipped_files"] = int(skipped)
  writer.write_scalars(step, values)
  return values


def describe(config, method, state, mesh):
  """The start-up summary: method, network, parameter counts, devices."""
  def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  others = "".join(f", {name} {count(t.params):,}"
                   for name, t in state.extra.items())
  devices = jax.devices()
  return (f"{method.name}: DeepLab-V2 ResNet-{config.model.depth} (width "
          f"{config.model.width}, {config.model.num_classes} classes, "
          f"{config.train.compute_dtype}, remat {config.model.remat}), "
          f"{count(state.params):,} parameters{others}; "
          f"{len(devices)} {devices[0].platform.upper()} device(s) "
          f"({devices[0].device_kind}) in {jax.process_count()} process(es), "
          f"mesh {dict(mesh.shape)}; global batch {config.train.batch_size} "
          f"per domain x {config.train.grad_accum_steps} micro-batch(es)")


def _checkpoint(manager, step, state, iterator):
  if not is_finite(state):
    raise FloatingPointError(
        f"non-finite parameters at step {step}; not saving. The last "
        "checkpoint is intact.")
  checkpointing.save(manager, step, state, iterator)


def warn_protocol(config, method):
  """Warns when PLCA's test-time aggregation evaluates another method."""
  if config.eval.aggregate and not method.test_time_aggregation:
    logging.warning(
        "config.eval.aggregate=True evaluates %s with PLCA's test-time "
        "spatial aggregation, which its authors do not use; set "
        "--config.eval.aggregate=False for the method's own protocol.",
        method.name)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, evaluate_during_training=True):
  """Trains (resuming from WORKDIR/checkpoints) and evaluates; returns state."""
  # Imported here, not at the top: clu's metric writers import TensorFlow,
  # which only the loop's writing needs. Building the update
  # (create_train_state, create_train_step) and benchmarks/ then run where
  # TensorFlow is not installed (the GPU image of docs/cloud.md).
  # pylint: disable=g-import-not-at-top
  from plca_jax import writers  # first: it imports TensorFlow quietly
  from clu import periodic_actions
  # pylint: enable=g-import-not-at-top
  xla.check_cpu_devices(config.train.cpu_devices)
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = sharding.create_mesh()
  config, notes = schedule.resolve(config, mesh.size)
  for note in notes:
    logging.info("%s", note)
  method = methods.get_method(config)
  warn_protocol(config, method)

  # Data.
  train_iter = input_pipeline.create_train_iterator(
      config, process_index, process_count, wrap_source=method.wrap_source)
  fields = {d: method.batch_fields(d) for d in base.DOMAINS}

  # Model and optimizer: resume, else init_from, else scratch.
  manager = checkpointing.create_manager(workdir,
                                         config.train.keep_checkpoints)
  try:  # closed (pending saves written) however the run ends
    rng = jax.random.key(config.seed)
    latest = manager.latest_step()
    if latest is not None:  # the checkpoint replaces any init_from
      config = config.copy_and_resolve_references()
      config.init_from = ""
    state = create_train_state(config, method, rng, mesh)
    restored, restored_step = checkpointing.restore_latest(manager, state,
                                                           train_iter)
    if restored is not None:
      logging.info("Resumed from %s step %d", manager.directory, restored_step)
      state = restored
    start_step = int(state.step)
    logging.info("%s", describe(config, method, state, mesh))
    # Metrics written after the restored step (by a run that stopped before
    # its next checkpoint) are set aside: every step appears once.
    if process_index == 0:
      writers.set_aside_after(workdir, start_step)
    writer = writers.create_writer(workdir, process_index)
    if start_step == 0:
      writer.write_hparams(_hparams(config))

    # The jitted update.
    step_fn = create_train_step(config, method, mesh)
    train_key = step_key(config)
    eval_model = method.eval_model()
    eval_step_fn = evaluate.create_eval_step(config, eval_model, mesh)
    num_steps = config.train.num_steps
    hooks = []
    report = periodic_actions.ReportProgress(
        num_train_steps=num_steps, writer=writer,
        every_steps=config.train.log_every)
    if process_index == 0:
      hooks.append(report)
      if config.train.profile_steps > 0:
        hooks.append(periodic_actions.Profile(
            logdir=workdir, num_profile_steps=config.train.profile_steps,
            profile_duration_ms=None,
            first_profile=config.train.profile_first_step, every_secs=None))
    preemption = _Preemption(install=process_count == 1)

    # The loop.
    collection, skipped, last_phase = None, 0, None
    logging.info("Training steps %d..%d", start_step + 1, num_steps)
    last_log = (start_step, time.perf_counter())
    try:
      for step in range(start_step + 1, num_steps + 1):
        phase = method.phase_of(step - 1)
        if phase != last_phase and last_phase is not None:
          logging.info("%s: phase %d from update %d (its update compiles "
                       "now).", method.name, phase, step)
        last_phase = phase
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch, n_skipped = next_update_batch(
              train_iter, config.train.grad_accum_steps, fields)
          pairing_info = batch.pop("pairing", None)
          state, scalars = step_fn(state, sharding.to_global(batch, mesh, 1),
                                   train_key, phase)
        skipped += n_skipped
        if pairing_info is not None:
          scalars = _observe_pairing(train_iter, scalars, pairing_info,
                                     process_count)
        if collection is None:
          collection_cls = metrics_lib.train_collection(sorted(scalars))
        update = collection_cls.single_from_model_output(**scalars)
        collection = update if collection is None else collection.merge(update)
        if step <= start_step + 3:
          logging.info("Finished step %d.", step, extra=console.FILE_ONLY)
        if step == start_step + 1:  # rates and ETA leave compilation out
          jax.block_until_ready(scalars)
          last_log = (step, time.perf_counter())
        for hook in hooks:
          hook(step)
        last = step == num_steps
        if step % config.train.log_every == 0 or last:
          values = _write_train_metrics(writer, step, collection, skipped,
                                        method)
          now = time.perf_counter()
          rate = ((step - last_log[0]) / max(now - last_log[1], 1e-9)
                  if step > last_log[0] else None)
          last_log = (step, now)
          logging.info("%s", console.progress_line(step, num_steps, rate,
                                                   values))
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
                config, eval_model,
                method.eval_variables(network_variables(state)), mesh, writer,
                step, eval_step_fn)
    finally:
      preemption.restore()
      writer.flush()
    return state
  finally:
    manager.close()
