"""The PLCA objective of one micro-batch (docs/method.md, Losses).

total = ce + lovasz_weight * lovasz + association_weight * (fass + cass)
        + lsr_weight * (lsr_source + lsr_target), each term switchable: the
paper's Table 1 ladder and its ablations.
"""

import jax
import jax.numpy as jnp

from plca_jax.losses.association import cycle_association
from plca_jax.losses.association_stats import association_statistics
from plca_jax.losses.segmentation import cross_entropy
from plca_jax.losses.segmentation import downsample_labels
from plca_jax.losses.segmentation import host_sort_of
from plca_jax.losses.segmentation import lovasz_softmax
from plca_jax.losses.segmentation import lsr_loss
from plca_jax.losses.segmentation import upsample_bilinear
from plca_jax.losses.similarity import at_least_f32
from plca_jax.losses.similarity import chunk_for


def plca_objective(source_outputs, target_outputs, source_labels, *,
                   use_ce=True, use_lovasz=True, use_fass=True, use_cass=True,
                   use_lsr=True, aggregate_target=True, sim_plca=False,
                   lovasz_weight=1.5, association_weight=0.1,
                   lsr_weight=0.01, alpha=0.5, lsr_lambda=10.0,
                   ignore_label=255, chunk_size=None, chunk_above_pixels=0,
                   host_sort=None, target_labels=None,
                   association_precision="highest"):
  """Total PLCA loss of one source and one target micro-batch.

  total = ce + lovasz_weight * lovasz + association_weight * (fass + cass)
          + lsr_weight * (lsr_source + lsr_target).

  The paper's Table 1 ladder is use_ce; +use_lovasz; +use_fass; +use_cass;
  +use_lsr. `aggregate_target=False` drops spatial aggregation (eq. 7-8);
  `sim_plca=True` replaces the contrastive association loss by
  -(D_st[i, j*] + D_ts[j*, i*]) on the raw similarities. The default
  lovasz_weight 1.5 is the release's effective beta1 (0.75 summed over its 2
  accumulated micro-batches, docs/method.md, Losses); the paper states 0.75.

  Args:
    source_outputs: model output dict, "features" (N, h, w, C) and "logits"
      (N, h, w, M), for the source images.
    target_outputs: the same for the target images (a separate forward pass).
    source_labels: (N, H, W) int source labels at image resolution.
    (the rest): switches and weights as above; `chunk_size` bounds the
      similarity rows alive at once in the association, for images of more
      than `chunk_above_pixels` grid pixels (smaller ones run unchunked:
      `chunk_for`); `host_sort`: how the Lovasz term sorts
      (`segmentation.descending_order`; None: decided from the backend);
      `association_precision`: of the association's matrix products
      (`similarity.PRECISIONS`).
    target_labels: optional (N, H', W') int target labels, for the
      "*_correct" diagnostics only: no loss term reads them (tested).

  Returns:
    (total, terms): scalar total, and a dict of float32 scalars with each
    enabled term ("ce", "lovasz", "fass", "cass", "lsr_source", "lsr_target")
    plus association diagnostics ("fass_consistent", "fass_reached" and,
    with target labels, "fass_correct", ...; see `association_statistics`).
  """
  logits_s = at_least_f32(source_outputs["logits"])
  logits_t = at_least_f32(target_outputs["logits"])
  terms = {}
  total = jnp.zeros((), logits_s.dtype)
  label_size = source_labels.shape[1:3]
  if use_ce or use_lovasz:
    up = upsample_bilinear(logits_s, label_size)
  if use_ce:
    terms["ce"] = cross_entropy(up, source_labels, ignore_label)
    total += terms["ce"]
  if use_lovasz:
    terms["lovasz"] = lovasz_softmax(jax.nn.softmax(up, axis=-1),
                                     source_labels, ignore_label,
                                     host_sort=host_sort)
    total += lovasz_weight * terms["lovasz"]

  grid_labels = downsample_labels(source_labels, logits_s.shape[1:3])
  target_grid = None
  if target_labels is not None:
    target_grid = jax.lax.stop_gradient(downsample_labels(
        target_labels, logits_t.shape[1:3])).reshape(logits_t.shape[0], -1)
  for name, enabled, metric, s, t in (
      ("fass", use_fass, "cos", source_outputs["features"],
       target_outputs["features"]),
      ("cass", use_cass, "kl", jax.nn.softmax(logits_s, axis=-1),
       jax.nn.softmax(logits_t, axis=-1))):
    if not enabled:
      continue
    assoc = cycle_association(
        s, t, grid_labels, metric, aggregate_target=aggregate_target,
        alpha=alpha, ignore_label=ignore_label,
        chunk_size=chunk_for(chunk_size, chunk_above_pixels, s, t),
        sim_plca=sim_plca, precision=association_precision)
    terms[name] = assoc["mean_loss"]
    total += association_weight * terms[name]
    target_size = t.shape[1] * t.shape[2]
    for key, value in association_statistics(
        assoc, target_size, target_grid, ignore_label).items():
      terms[f"{name}_{key}"] = jax.lax.stop_gradient(value)

  if use_lsr:
    terms["lsr_source"] = lsr_loss(logits_s, lsr_lambda)
    terms["lsr_target"] = lsr_loss(logits_t, lsr_lambda)
    total += lsr_weight * (terms["lsr_source"] + terms["lsr_target"])
  return total, terms


def total_loss(config, source_outputs, target_outputs, source_labels,
               target_labels=None):
  """`plca_objective` with switches and weights from `config.loss`."""
  c = config.loss
  return plca_objective(
      source_outputs, target_outputs, source_labels, use_ce=c.use_ce,
      use_lovasz=c.use_lovasz, use_fass=c.use_fass, use_cass=c.use_cass,
      use_lsr=c.use_lsr, aggregate_target=c.aggregate_target,
      sim_plca=c.sim_plca, lovasz_weight=c.lovasz_weight,
      association_weight=c.association_weight, lsr_weight=c.lsr_weight,
      alpha=c.alpha, lsr_lambda=c.lsr_lambda, ignore_label=c.ignore_label,
      chunk_size=c.chunk_size, chunk_above_pixels=c.chunk_above_pixels,
      host_sort=host_sort_of(c.lovasz_sort), target_labels=target_labels,
      association_precision=c.association_precision)
