"""Pixel-level cycle association (SPEC.md section 2).

Every similarity used here has the form D(a_i, b_j) = A_i . B_j + c_i:
- `cos`: A = a / max(|a|, 1e-12), B likewise, c = 0;
- `kl` (negative KL): A = p, B = log(q + 1e-10), c = -sum p log(p + 1e-10),
  so D(p_i, q_j) = -KL(p_i || q_j).
With that, spatial aggregation and both directions of the cycle are one
row-wise kernel: a row of D is a (L,) vector computed from one left pixel and
the whole right image. Rows are processed `chunk_size` at a time with
`jax.lax.map` and rematerialised (`jax.checkpoint`) in the backward pass, so
no L x L matrix ever exists: peak memory is O(chunk_size * L + L * C).

All functions work on one image, (L, C) pixel sets, and are vmapped over the
batch; the association of an image pair therefore stays on the device that
holds the pair. Computation is in float32 for float32/bfloat16 inputs
(float64 inputs stay float64, which the tests use).
"""

import functools

import jax
import jax.numpy as jnp

KL_EPS = 1e-10
NORM_EPS = 1e-12
STD_EPS = 1e-10
METRICS = ("cos", "kl")


def at_least_f32(x):
  """x in float32, or float64 if it already is (bfloat16 is promoted)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_metric(metric):
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}; expected one of {METRICS}")


def _l2_normalize(x):
  """x / max(|x|, 1e-12) with a finite gradient at x = 0 (like F.normalize)."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS**2))


def _operands(x, metric):
  """(A, c, B) of x: row i of D(x, y) is A_i . B_y + c_i, column j is B_j."""
  if metric == "cos":
    n = _l2_normalize(x)
    return n, jnp.zeros(x.shape[:-1], x.dtype), n
  return x, -jnp.sum(x * jnp.log(x + KL_EPS), axis=-1), jnp.log(x + KL_EPS)


def contrast_normalize(d):
  """Softmax of (d - mean) / (std + 1e-10) over the last axis.

  mean and unbiased std are stop-gradient (the release's `scoring`).
  """
  d_sg = jax.lax.stop_gradient(d)
  mean = jnp.mean(d_sg, axis=-1, keepdims=True)
  std = jnp.std(d_sg, axis=-1, keepdims=True, ddof=1)
  return jax.nn.softmax((d - mean) / (std + STD_EPS), axis=-1)


def _row_map(fn, rows, chunk_size):
  """Applies the per-row `fn` to every row of the pytree `rows`.

  `chunk_size=None` (or >= the row count) evaluates all rows at once;
  otherwise rows go `chunk_size` at a time through `jax.lax.map`, each chunk
  rematerialised in the backward pass so that only O(chunk_size * L) of the
  similarity matrix is ever alive.
  """
  num_rows = jax.tree.leaves(rows)[0].shape[0]
  if chunk_size is None or chunk_size >= num_rows:
    return jax.vmap(fn)(rows)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}; expected None or >= 1")
  return jax.lax.map(jax.checkpoint(fn), rows, batch_size=chunk_size)


def _aggregate_single(x, metric, alpha, chunk_size):
  """Eq. 7-8 on one image: x <- (1 - alpha) x + alpha W x, x (L, C)."""
  a, c, b = _operands(x, metric)

  def row(args):
    a_i, c_i = args
    d = b @ a_i + c_i  # (L,)
    w = contrast_normalize(d) if metric == "cos" else jax.nn.softmax(d)
    return w @ x

  return (1.0 - alpha) * x + alpha * _row_map(row, (a, c), chunk_size)


def spatial_aggregate(x, metric="cos", alpha=0.5, chunk_size=None):
  """Blends each pixel with its similarity-weighted aggregation (eq. 7-8).

  W = contrast_normalize(D_cos(x, x)) for `cos`, softmax(D_kl(x, x)) for `kl`;
  returns (1 - alpha) x + alpha W x. Gradients flow through W and x.

  Args:
    x: (N, H, W, C) features (`cos`) or probabilities (`kl`).
    metric: "cos" or "kl".
    alpha: blend weight of the aggregation.
    chunk_size: rows of W alive at once (None: all).

  Returns:
    (N, H, W, C) in float32 (float64 for float64 input).
  """
  _check_metric(metric)
  n, h, w, ch = x.shape
  flat = at_least_f32(x.reshape(n, h * w, ch))
  fn = functools.partial(_aggregate_single, metric=metric, alpha=alpha,
                         chunk_size=chunk_size)
  return jax.vmap(fn)(flat).reshape(n, h, w, ch)


@jax.custom_vjp
def bce_positive(x):
  """-log(x) like torch's BCELoss with target 1: log clamped at -100.

  The gradient is torch's (x - 1) / max(x (1 - x), 1e-12): -1/x in the
  interior and exactly 0 at x = 1.
  """
  return -jnp.maximum(jnp.log(x), -100.0)


def _bce_fwd(x):
  return bce_positive(x), x


def _bce_bwd(x, g):
  return (g * (x - 1.0) / jnp.maximum(x * (1.0 - x), 1e-12),)


bce_positive.defvjp(_bce_fwd, _bce_bwd)


def _cycle_single(s, t, labels, metric, ignore_label, chunk_size, sim_plca):
  """Cycle association of one image pair, s (Ls, C), t (Lt, C), labels (Ls,).

  Returns per-source-pixel arrays: loss (Ls,), j* (Ls,), i* (Ls,),
  valid (Ls,) and selected (Ls,) booleans.
  """
  a_s, c_s, b_s = _operands(s, metric)
  a_t, c_t, b_t = _operands(t, metric)

  def row(args):
    a_i, c_i = args
    d_st = b_t @ a_i + c_i  # D_st(i, :), (Lt,)
    j = jnp.argmax(d_st)  # first index on ties
    d_ts = b_s @ a_t[j] + c_t[j]  # D_ts(j*, :), (Ls,)
    i_back = jnp.argmax(d_ts)
    if sim_plca:
      loss = -(d_st[j] + d_ts[i_back])
    else:
      p = contrast_normalize(d_st)[j] * contrast_normalize(d_ts)[i_back]
      loss = bce_positive(p)
    return loss, j, i_back

  loss, j_star, i_star = _row_map(row, (a_s, c_s), chunk_size)
  valid = labels != ignore_label
  selected = valid & (labels[i_star] == labels)
  return loss, j_star, i_star, valid, selected


def cycle_association(source, target, source_labels, metric="cos", *,
                      aggregate_target=True, alpha=0.5, ignore_label=255,
                      chunk_size=None, sim_plca=False):
  """Per-pixel cycle association i -> j*(i) -> i*(i) of each image pair.

  Args:
    source: (N, Hs, Ws, C) source features (`cos`) or probabilities (`kl`).
    target: (N, Ht, Wt, C) target features or probabilities.
    source_labels: (N, Hs, Ws) int labels on the source grid.
    metric: "cos" or "kl".
    aggregate_target: apply `spatial_aggregate` to the target first.
    alpha: its blend weight.
    ignore_label: label value excluded from the association.
    chunk_size: similarity rows alive at once (None: all).
    sim_plca: per-pixel loss -(D_st[i, j*] + D_ts[j*, i*]) on the raw
      similarities ("Sim-PLCA") instead of the contrastive form.

  Returns:
    dict of (N, Hs*Ws) arrays: "loss" (per source pixel, before masking),
    "j_star", "i_star" (int32 indices into the flattened target / source
    grids), "valid" and "selected" (bool), and "source_labels" (the labels
    given, flattened).
  """
  _check_metric(metric)
  n, hs, ws, ch = source.shape
  if target.shape[0] != n or target.shape[-1] != ch:
    raise ValueError(f"source {source.shape} and target {target.shape} must "
                     "share batch and channel sizes")
  if source_labels.shape != (n, hs, ws):
    raise ValueError(f"source_labels {source_labels.shape} must be "
                     f"{(n, hs, ws)} (the source grid)")
  if aggregate_target:
    target = spatial_aggregate(target, metric, alpha, chunk_size)
  s = at_least_f32(source.reshape(n, hs * ws, ch))
  t = at_least_f32(target.reshape(n, -1, ch))
  y = source_labels.reshape(n, hs * ws)
  fn = functools.partial(_cycle_single, metric=metric,
                         ignore_label=ignore_label, chunk_size=chunk_size,
                         sim_plca=sim_plca)
  loss, j_star, i_star, valid, selected = jax.vmap(fn)(s, t, y)
  return dict(loss=loss, j_star=j_star, i_star=i_star, valid=valid,
              selected=selected, source_labels=y)


def masked_mean(values, mask):
  """Mean of `values` where `mask`; 0 (with zero gradient) if mask is empty."""
  mask = mask.astype(values.dtype)
  total = jnp.sum(jnp.where(mask > 0, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def association_statistics(assoc, target_size, target_labels=None,
                           ignore_label=255):
  """Diagnostics of a `cycle_association` result.

  Args:
    assoc: the dict `cycle_association` returns.
    target_size: number of target grid pixels (Ht * Wt).
    target_labels: optional (N, Ht * Wt) int target labels on the target
      grid, for analysis only (they never enter a loss).
    ignore_label: label value that counts as unlabelled.

  Returns:
    dict of float32 scalars: "consistent": share of valid source pixels
    whose cycle returns to their class; "reached": mean over images of the
    share of distinct target pixels that are j* of some valid source pixel;
    with target labels also "correct": share of consistent cycles, among
    those whose j* is labelled, where the target pixel j* has the source
    pixel's class (0 if there are none).
  """
  valid = assoc["valid"]
  consistent = (jnp.sum(assoc["selected"]) /
                jnp.maximum(jnp.sum(valid), 1))

  def reached(j_star, v):
    hit = jnp.zeros((target_size,), jnp.bool_).at[j_star].max(v)
    return jnp.mean(hit.astype(jnp.float32))

  stats = {"consistent": consistent.astype(jnp.float32),
           "reached": jnp.mean(jax.vmap(reached)(assoc["j_star"], valid))}
  if target_labels is not None:
    hit, counted, _ = _correct(assoc, target_labels, ignore_label)
    stats["correct"] = (jnp.sum(hit) / jnp.maximum(jnp.sum(counted), 1)
                        ).astype(jnp.float32)
  return stats


def _correct(assoc, target_labels, ignore_label):
  """Per source pixel: (j* has the source class, cycle counted, label at j*).

  Counted: consistent cycles whose j* is labelled.
  """
  if (target_labels.ndim != 2 or
      target_labels.shape[0] != assoc["j_star"].shape[0]):
    raise ValueError(f"target_labels {target_labels.shape} must be (N, Ht * "
                     f"Wt) with N = {assoc['j_star'].shape[0]}, the batch of "
                     "the association")
  t_at_j = jnp.take_along_axis(target_labels, assoc["j_star"], axis=1)
  counted = assoc["selected"] & (t_at_j != ignore_label)
  return counted & (t_at_j == assoc["source_labels"]), counted, t_at_j


def association_confusion(assoc, target_labels, num_classes,
                          ignore_label=255):
  """(M, M) int32 counts of consistent cycles: source class i (row) whose
  target pixel j* has class k (column); unlabelled j* are not counted.

  The diagonal over the row sums is the per-class "correct" share.
  """
  _, counted, t_at_j = _correct(assoc, target_labels, ignore_label)
  rows = jnp.where(counted, assoc["source_labels"], 0).reshape(-1)
  cols = jnp.where(counted, t_at_j, 0).reshape(-1)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32).at[
      rows * num_classes + cols].add(counted.reshape(-1).astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


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
  assoc = cycle_association(source, target, source_labels, metric,
                            aggregate_target=aggregate_target, alpha=alpha,
                            ignore_label=ignore_label, chunk_size=chunk_size)
  return masked_mean(assoc["loss"], assoc["selected"])
