"""The method seam: what a training method declares, and shared helpers.

A method is a subclass of `Method` in its own module under
`plca_jax/methods/`, registered in `plca_jax/methods/__init__.py`. It
declares

- `name` and `default_config()`: its config block, `config.<name>` (added to
  every config by `configs/default.py`; None for none);
- its networks: `model` (the segmentation network, which evaluation,
  checkpoints' "params"/"batch_stats" and `init_from` use) and
  `extra_networks()`, {tree name: (flax module, example inputs)} for the
  others (e.g. a discriminator), each with its own optimizer
  (`create_optimizer(tree)`) and learning-rate schedule (`learning_rates`);
- its inputs: `batch_fields(domain)`, the arrays of each domain's batch the
  update reads, and `wrap_source(domain, source)`, a host-side hook that
  adds fields to a domain's records (e.g. pseudo-labels read from disk;
  every field whose name ends in "label" is resized, flipped and cropped
  like the label);
- its evaluation network, when the method's protocol transforms test images
  first (LDR translates them): `eval_model()` and `eval_variables(networks)`
  (default: the segmentation network and its variables);
- its update: `micro_batch_grads(variables, micro, rng, step, phase)`,
  the gradients of each parameter tree it trains for one micro-batch, the
  new BatchNorm statistics and scalars to log; a method trained in phases
  (LDR: its translation networks, then segmentation) says which update
  belongs to which with `phase_of(step)`; a tree moved otherwise than by
  its gradients (DACS's teacher, an average of the student) is set in
  `after_update(trees, step)`, after the optimizer updates.

`plca_jax.train` does the rest for every method alike: the train state of
every tree, the jitted and sharded step (micro-batch accumulation, one
optimizer update per tree, a per-step random key), checkpoints, NaN checks,
logging and evaluation.
"""

from typing import Any

import jax
import jax.numpy as jnp

from plca_jax import models
from plca_jax import optim
from plca_jax.data import transforms

SEGMENTATION = "segmentation"  # the tree name of the segmentation network
DOMAINS = ("source", "target")


class Method:
  """Base class: a segmentation network trained with SGD; no update."""

  name = ""
  # Whether the method's own evaluation protocol uses PLCA's test-time
  # spatial aggregation (`config.eval.aggregate`); only PLCA's does.
  test_time_aggregation = False

  def __init__(self, config):
    self.config = config
    self.model = self.create_model()

  @staticmethod
  def default_config():
    """The method's config block (a ConfigDict), or None."""
    return None

  @property
  def block(self):
    """This method's config block, `config.<name>`."""
    return self.config[self.name]

  # Networks and optimizers.

  def create_model(self):
    """The segmentation network (evaluated, checkpointed as "params")."""
    return models.get_model(self.config)

  def extra_networks(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """{tree: (module, example init inputs)} of the other networks."""
    return {}

  def create_optimizer(self, tree):
    """The optax transformation of a parameter tree."""
    if tree != SEGMENTATION:
      raise NotImplementedError(f"{type(self).__name__} has no optimizer "
                                f"for tree {tree!r}")
    return optim.create_optimizer(self.config)

  def learning_rates(self, step):
    """{scalar name: learning rate at `step`} for the training log."""
    return {"learning_rate": optim.create_learning_rate_fn(self.config)(step)}

  # Evaluation.

  def eval_model(self):
    """The network evaluation runs (`evaluate.predict`): `model`, or a
    module that transforms the test images first; such a module sets the
    class attribute `reads_images = True` to receive the 0-255 RGB images
    instead of the encoded network input."""
    return self.model

  def eval_variables(self, networks):
    """{tree: {"params", "batch_stats"}} -> `eval_model()`'s variables."""
    return networks[SEGMENTATION]

  # Inputs.

  def batch_fields(self, domain):
    """Names of the arrays of a domain's batch the update reads."""
    del domain
    return ("image", "label")

  def wrap_source(self, domain, source):
    """Host-side hook: a data source adding fields to `domain`'s records."""
    del domain
    return source

  # The update.

  def phase_of(self, step):
    """The phase (0, 1, ...) of the update at `step` (a Python int: the
    number of updates before it).

    The trainer compiles one update per phase and runs each step's, so a
    phase's update holds only its own computation (LDR's two phases under
    one traced `lax.cond` ran 9x slower on XLA:CPU). One phase by default.
    """
    del step
    return 0

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    """Gradients of the parameter trees trained in `phase` for one
    micro-batch.

    Args:
      variables: {tree: {"params": ..., "batch_stats": ...}}.
      micro: {domain: {field: array (B, ...)}} with the `batch_fields`.
      rng: a key for this micro-batch (a function of seed, step and
        micro-batch index).
      step: the update's step (int32 scalar; 0 for the first update).
      phase: `phase_of(step)`, static (a Python int).

    Returns:
      (grads {tree: grads}, batch_stats {tree: new statistics}, scalars
      {name: scalar}). A tree absent from grads is not updated at all (no
      weight decay, momentum or schedule step). Scalars must include
      "loss", the segmentation network's objective, and have the same
      names in every phase (the log's metrics are declared once).
    """
    raise NotImplementedError

  def after_update(self, trees, step):
    """Every tree after the update's optimizer steps -> the trees kept.

    Args:
      trees: {tree: TrainState}, the segmentation network's included, with
        this update's optimizer steps applied.
      step: the update's step (int32 scalar; 0 for the first update).

    Returns:
      the trees (unchanged by default).
    """
    del step
    return trees


def encode(images, config):
  """uint8 (or float 0-255) RGB images -> the network's input encoding."""
  return transforms.network_input(images, config.data)


def forward(model, params, batch_stats, images):
  """Training-mode forward pass: (outputs, new BatchNorm statistics)."""
  out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                             images, train=True, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def forward_pair(model, params, batch_stats, micro, config, *,
                 first="source"):
  """Source and target through the network in training mode with
  per-domain BatchNorm statistics: (out_s, out_t, new statistics).

  `first` is the domain that goes through first. The outputs do not depend
  on it (training-mode BatchNorm normalises with batch statistics) but the
  running statistics used at evaluation do: the second domain's batch
  weighs 1 - momentum in them, the first's (1 - momentum) * momentum.

  With `config.train.domains_in_one_pass` (and images of one shape) both
  domains go through as one batch of 2B images, stacked image by image
  (first domain's image b at row 2b, the other's at 2b + 1, so each
  device's rows stay on it), and BatchNorm normalises the two interleaved
  groups separately (`norm.BatchNorm.groups`): the same outputs, gradients
  and running statistics as two passes up to float rounding, with larger
  convolutions (tests/methods_test.py, docs/performance.md). Domains
  of different image shapes, and models without a `bn_groups` attribute,
  take two passes.
  """
  if first not in DOMAINS:
    raise ValueError(f"first={first!r}; expected one of {DOMAINS}")
  order = (first, *(d for d in DOMAINS if d != first))
  images = [encode(micro[d]["image"], config) for d in order]
  out = {}
  if (config.train.domains_in_one_pass and
      images[0].shape == images[1].shape and hasattr(model, "bn_groups")):
    both = jnp.stack(images, axis=1).reshape(-1, *images[0].shape[1:])
    joint, batch_stats = forward(model.clone(bn_groups=2), params,
                                 batch_stats, both)
    for k, domain in enumerate(order):
      out[domain] = jax.tree.map(
          lambda a, k=k: a.reshape(-1, 2, *a.shape[1:])[:, k], joint)
  else:
    for domain, x in zip(order, images):
      out[domain], batch_stats = forward(model, params, batch_stats, x)
  return out["source"], out["target"], batch_stats


def segmentation_grads(loss_fn, variables, *args):
  """`micro_batch_grads` of a method that trains only the segmentation
  network: `loss_fn(params, batch_stats, *args)` returns (total, (terms,
  new batch_stats))."""
  seg = variables[SEGMENTATION]
  (loss, (terms, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(seg["params"], seg["batch_stats"], *args)
  return ({SEGMENTATION: grads}, {SEGMENTATION: batch_stats},
          {"loss": loss, **terms})


def labels_of(micro, domain, field="label"):
  return micro[domain][field].astype(jnp.int32)
