"""PLCA (Kang et al., NeurIPS 2020): the project's method.

docs/method.md, Losses.

Per micro-batch, target then source go through the network with
per-domain BatchNorm statistics over the global batch (`base.forward_pair`:
one batch of both domains with grouped BatchNorm, or two passes) and the PLCA
objective (`plca_jax.losses.total_loss`, switches and weights in
`config.loss`) is differentiated with respect to the segmentation network.
"""

import functools

import jax
import jax.numpy as jnp

from plca_jax import losses
from plca_jax.methods import base


def micro_batch_loss(params, batch_stats, micro, *, model, config):
  """Loss of one micro-batch: (total, (terms, new batch_stats)).

  `micro` is {"source": {"image", "label"}, "target": {...}} with uint8
  images (N, H, W, 3); the parameters are what gradients are taken of.
  """
  # Target first, then source, as the release (docs/method.md, Network):
  # the running BatchNorm statistics used at evaluation lean to the source.
  out_s, out_t, batch_stats = base.forward_pair(model, params, batch_stats,
                                               micro, config, first="target")
  labels = base.labels_of(micro, "source")
  # Target labels, when the config loads them (synthetic data, analysis),
  # feed only the "*_correct" association statistics, never a loss.
  target_labels = (base.labels_of(micro, "target")
                   if config.data.target.require_labels else None)
  total, terms = losses.total_loss(config, out_s, out_t, labels,
                                   target_labels)
  if pseudo_pairing(config):
    terms["target_classes"] = jax.lax.stop_gradient(predicted_class_sets(
        out_t["logits"], config.data.pairing_min_share))
  return total, (terms, batch_stats)


def pseudo_pairing(config):
  """True when the class-overlap pairing reads predicted target classes."""
  return (config.data.pairing == "class_overlap" and
          config.data.pairing_target_classes == "pseudo")


def predicted_class_sets(logits, min_share):
  """(N, M) bool: the classes predicted on >= `min_share` of each grid."""
  pred = jnp.argmax(logits, axis=-1).reshape(logits.shape[0], -1)
  share = jnp.mean(jax.nn.one_hot(pred, logits.shape[-1], dtype=jnp.float32),
                   axis=1)
  return share >= min_share


class PLCA(base.Method):
  """Pixel-level cycle association; its config block is `config.loss`."""

  name = "plca"
  test_time_aggregation = True

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, step, phase  # PLCA's update is deterministic; one phase
    seg = variables[base.SEGMENTATION]
    grad_fn = jax.value_and_grad(
        functools.partial(micro_batch_loss, model=self.model,
                          config=self.config), has_aux=True)
    (loss, (terms, batch_stats)), grads = grad_fn(
        seg["params"], seg["batch_stats"], micro)
    return ({base.SEGMENTATION: grads}, {base.SEGMENTATION: batch_stats},
            {"loss": loss, **terms})
