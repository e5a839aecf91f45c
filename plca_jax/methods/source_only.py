"""Source only: the segmentation network trained on the labelled source.

The lower rung of every domain-adaptation table: cross-entropy on the
source images (+ optionally the Lovasz-softmax term, as PLCA's first two
rungs); the target images are not used (nor loaded onto the device), so
BatchNorm statistics are the source's.
"""

import functools

import jax
import ml_collections

from plca_jax import losses
from plca_jax.methods import base


def source_loss(params, batch_stats, micro, *, model, config, block):
  """CE (+ lovasz_weight * Lovasz) of the source micro-batch."""
  out, batch_stats = base.forward(
      model, params, batch_stats, base.encode(micro["source"]["image"],
                                              config))
  labels = base.labels_of(micro, "source")
  ignore = config.loss.ignore_label
  logits = losses.at_least_f32(out["logits"])
  up = losses.upsample_bilinear(logits, labels.shape[1:3])
  terms = {"ce": losses.cross_entropy(up, labels, ignore)}
  total = terms["ce"]
  if block.use_lovasz:
    terms["lovasz"] = losses.lovasz_softmax(
        jax.nn.softmax(up, axis=-1), labels, ignore,
        host_sort=losses.host_sort_of(config.loss.lovasz_sort))
    total = total + block.lovasz_weight * terms["lovasz"]
  return total, (terms, batch_stats)


class SourceOnly(base.Method):
  """CE (+ Lovasz) on the source; `config.source_only`."""

  name = "source_only"

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        use_lovasz=False,  # add PLCA's Lovasz-softmax term
        lovasz_weight=1.5,  # its weight when on (PLCA's default)
    ))

  def batch_fields(self, domain):
    return ("image", "label") if domain == "source" else ()

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, step, phase
    return base.segmentation_grads(functools.partial(
        source_loss, model=self.model, config=self.config, block=self.block),
                                   variables, micro)
