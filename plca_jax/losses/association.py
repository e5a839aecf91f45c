"""Pixel-level cycle association (docs/method.md, Losses).

`cycle_association` runs, per image pair, the `cos` (L_fass,
`cos_cycle`) or `kl` (L_cass, `kl_cycle`) cycle i -> j*(i) -> i*(i)
after the target's spatial aggregation (`aggregation`); the
diagnostics of its result are in `association_stats`.

The cycle of one image pair is one custom VJP (`_cycle_single`). Its
output that carries a gradient is the scalar sum of the per-pixel losses
over the selected source pixels, so the gradient is that of a scalar: the
forward pass forms it alongside the loss and keeps only it (the size of
the inputs) for the backward pass, which scales it by the incoming
cotangent. Sim-PLCA (loss -(D_st + D_ts) on the raw similarities) has
u = -1 in the cycles' gradients and no softmax.

Per image pair (`similarity.per_image`): the association of an image
pair stays on the device that holds the pair.
"""

import functools

import jax
import jax.numpy as jnp

from plca_jax.losses import aggregation
from plca_jax.losses import cos_cycle
from plca_jax.losses import kl_cycle
from plca_jax.losses import similarity


def _cycle_rows(s, t, labels, metric, ignore_label, chunk_size, sim_plca,
                with_grads):
  """One pair s (Ls, C), t (Lt, C), labels (Ls,): outputs and gradients."""
  rows = (cos_cycle.cos_cycle_rows if metric == "cos" else
          kl_cycle.kl_cycle_rows)
  return rows(s, t, labels, ignore_label, chunk_size, sim_plca, with_grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _cycle_single(s, t, labels, metric, ignore_label, chunk_size, sim_plca,
                  precision):
  with similarity.products_precision(precision):
    return _cycle_rows(s, t, labels, metric, ignore_label, chunk_size,
                       sim_plca, with_grads=False)[0]


def _cycle_fwd(s, t, labels, metric, ignore_label, chunk_size, sim_plca,
               precision):
  # The gradients are formed here, with the outputs: every product of the
  # association is traced under its precision.
  with similarity.products_precision(precision):
    return _cycle_rows(s, t, labels, metric, ignore_label, chunk_size,
                       sim_plca, with_grads=True)


def _cycle_bwd(metric, ignore_label, chunk_size, sim_plca, precision, grads,
               ct):
  del metric, ignore_label, chunk_size, sim_plca, precision
  # Only the summed loss carries a gradient; the per-pixel outputs are
  # diagnostics (cycle_association returns them stop-gradient).
  ct_sum = ct[0]
  ds, dt = grads
  return ((ct_sum * ds).astype(ds.dtype), (ct_sum * dt).astype(dt.dtype),
          None)


_cycle_single.defvjp(_cycle_fwd, _cycle_bwd)


def cycle_association(source, target, source_labels, metric="cos", *,
                      aggregate_target=True, alpha=0.5, ignore_label=255,
                      chunk_size=None, sim_plca=False, precision="highest"):
  """Per-pixel cycle association i -> j*(i) -> i*(i) of each image pair.

  Args:
    source: (N, Hs, Ws, C) source features (`cos`) or probabilities (`kl`).
    target: (N, Ht, Wt, C) target features or probabilities.
    source_labels: (N, Hs, Ws) int labels on the source grid.
    metric: "cos" or "kl".
    aggregate_target: apply `aggregation.spatial_aggregate` to the target first.
    alpha: its blend weight.
    ignore_label: label value excluded from the association.
    chunk_size: similarity rows alive at once (None: all).
    sim_plca: per-pixel loss -(D_st[i, j*] + D_ts[j*, i*]) on the raw
      similarities ("Sim-PLCA") instead of the contrastive form.
    precision: of the matrix products of the association and aggregation
      (`similarity.PRECISIONS`; config.loss.association_precision).

  Returns:
    dict: "mean_loss", the association loss (mean of the per-pixel loss
    over the selected source pixels of the whole batch, 0 if there are
    none), the one output that carries a gradient; and (N, Hs*Ws) arrays:
    "loss" (per source pixel, before masking; stop-gradient), "j_star",
    "i_star" (int32 indices into the flattened target / source grids),
    "valid" and "selected" (bool), and "source_labels" (the labels given,
    flattened).
  """
  similarity.check_metric(metric)
  n, hs, ws, ch = source.shape
  if target.shape[0] != n or target.shape[-1] != ch:
    raise ValueError(f"source {source.shape} and target {target.shape} must "
                     "share batch and channel sizes")
  if source_labels.shape != (n, hs, ws):
    raise ValueError(f"source_labels {source_labels.shape} must be "
                     f"{(n, hs, ws)} (the source grid)")
  if aggregate_target:
    target = aggregation.spatial_aggregate(target, metric, alpha, chunk_size,
                                           precision)
  y = jnp.asarray(source_labels).reshape(n, hs * ws)
  fn = functools.partial(_cycle_single, metric=metric,
                         ignore_label=ignore_label, chunk_size=chunk_size,
                         sim_plca=sim_plca, precision=precision)
  loss_sum, loss, j_star, i_star, valid, selected = similarity.per_image(
      fn, source.reshape(n, hs * ws, ch), target.reshape(n, -1, ch), y)
  count = jnp.maximum(jnp.sum(selected), 1).astype(loss_sum.dtype)
  return dict(mean_loss=jnp.sum(loss_sum) / count,
              loss=jax.lax.stop_gradient(loss), j_star=j_star, i_star=i_star,
              valid=valid, selected=selected, source_labels=y)


def association_loss(source, target, source_labels, metric="cos", *,
                     aggregate_target=True, alpha=0.5, ignore_label=255,
                     chunk_size=None):
  """L_fass (`cos` on features) or L_cass (`kl` on probabilities).

  Mean over the source pixels of the whole batch whose cycle is consistent
  (label of i* equals label of i, neither ignored) of
  -log(S_st[i, j*] * S_ts[j*, i*]); zero with zero gradient if none is.

  Args:
    source: (N, H, W, C) source features or probabilities.
    target: (N, H', W', C) target features or probabilities.
    source_labels: (N, H, W) int source labels on the source grid.
    metric, aggregate_target, alpha, ignore_label, chunk_size: see
      `cycle_association`.

  Returns:
    scalar float32 loss.
  """
  return cycle_association(
      source, target, source_labels, metric,
      aggregate_target=aggregate_target, alpha=alpha,
      ignore_label=ignore_label, chunk_size=chunk_size)["mean_loss"]
