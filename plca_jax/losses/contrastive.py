"""Pixel-level contrastive loss with pseudo-labels (the pixel_contrast method).

For an image pair (a target image I_t and its target -> source spectral
translation I_ts, same geometry, so one pseudo-label map y for both) with
unit-normalised features f (I_t) and g (I_ts) on the feature grid:

  loss = -(1/N) sum_p (1/N_{y_p}) sum_q 1[y_p = y_q]
             log( exp(f_p . g_q / tau) / sum_k exp(f_p . g_k / tau) )

p over the pixels of I_t, q and k over the pixels of I_ts; pixels with the
ignore label are left out on both sides; N_c is the number of (valid) pixels
of I_ts with label c and N the number of pixels p that have at least one
positive. Because the positives of p share one label, the inner sum has a
closed form:

  (1/N_c) sum_{q: y_q = c} f_p . g_q / tau  -  logsumexp_k (f_p . g_k / tau)
    = f_p . mean_c(g) / tau  -  logsumexp_k (f_p . g_k / tau),

so only the log-sum-exp needs the L x L similarities, and it is computed in
row chunks (`chunk_size`) with each chunk recomputed in the backward pass:
memory grows linearly with the pixels, like the association.
"""

import functools

import jax
import jax.numpy as jnp

from plca_jax.losses.similarity import at_least_f32
from plca_jax.losses.similarity import NORM_EPS


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True),
                         NORM_EPS)


def _row_lse(f, g, valid_k, tau, chunk_size):
  """(L,) logsumexp over valid k of f_p . g_k / tau, in row chunks."""
  length = f.shape[0]
  chunk = length if not chunk_size else min(chunk_size, length)
  pad = (-length) % chunk
  rows = jnp.pad(f, ((0, pad), (0, 0))).reshape(-1, chunk, f.shape[-1])

  @jax.checkpoint
  def one(block):
    logits = block @ g.T / tau
    # A finite mask value: a row with no valid k stays finite (its result
    # is not used) and so does its gradient.
    logits = jnp.where(valid_k[None, :], logits, -1e30)
    return jax.nn.logsumexp(logits, axis=-1)

  return jax.lax.map(one, rows).reshape(-1)[:length]


def _one_pair(f, g, labels, *, num_classes, tau, ignore_label, chunk_size):
  """(sum over contributing p of the per-pixel loss, number of them)."""
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  onehot = jax.nn.one_hot(safe, num_classes, dtype=f.dtype) * valid[:, None]
  counts = jnp.sum(onehot, axis=0)  # N_c over I_ts
  means = (onehot.T @ g) / jnp.maximum(counts, 1)[:, None]  # (M, C)
  positive = f @ means.T / tau  # (L, M): f_p . mean_c(g) / tau
  positive = jnp.take_along_axis(positive, safe[:, None], axis=-1)[:, 0]
  lse = _row_lse(f, g, valid, tau, chunk_size)
  contributes = valid & (counts[safe] > 0)
  per_pixel = jnp.where(contributes, lse - positive, 0.0)
  return jnp.sum(per_pixel), jnp.sum(contributes.astype(f.dtype))


def pixel_contrast_loss(features, translated_features, labels, *,
                        num_classes, tau=0.1, ignore_label=255,
                        chunk_size=None):
  """The loss above, averaged over every contributing pixel of the batch.

  Args:
    features: (N, h, w, C) features of the target images.
    translated_features: (N, h, w, C) features of their translations.
    labels: (N, h, w) int pseudo-labels on the feature grid.
    num_classes: labels are in [0, num_classes) or `ignore_label`.
    tau: temperature.
    chunk_size: rows of similarities at a time (None: all at once).

  Returns:
    scalar; 0 (with zero gradient) when no pixel has a positive.
  """
  n, h, w, c = features.shape
  f = _normalize(at_least_f32(features).reshape(n, h * w, c))
  g = _normalize(at_least_f32(translated_features).reshape(n, h * w, c))
  pair = functools.partial(_one_pair, num_classes=num_classes, tau=tau,
                           ignore_label=ignore_label, chunk_size=chunk_size)
  sums, counts = jax.vmap(pair)(f, g, labels.reshape(n, h * w))
  total = jnp.sum(counts)
  return jnp.sum(sums) / jnp.maximum(total, 1.0)
