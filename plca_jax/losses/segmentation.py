"""Supervised and regularising losses: CE, Lovasz-softmax, LSR.

docs/method.md, Losses.

Also the two resampling operations the losses need, matching PyTorch:
`upsample_bilinear` (align_corners=False) and `downsample_labels` (`nearest`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from plca_jax import sharding
from plca_jax import xla
from plca_jax.losses import similarity


def _check_spatial(x, labels, what):
  if x.shape[:3] != labels.shape:
    raise ValueError(f"{what} {x.shape} and labels {labels.shape} must share "
                     "(N, H, W); upsample the prediction to the label size "
                     "first (upsample_bilinear)")


def nearest_indices(in_size, out_size):
  """Source indices of PyTorch's `nearest` resize along one axis.

  scale = float32(in / out); src = min(floor(float32(dst) * scale), in - 1),
  evaluated in float32 as PyTorch does (this differs from the exact integer
  floor(dst * in / out) for a few size pairs).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.floor(dst * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def downsample_labels(labels, size):
  """PyTorch-`nearest` resize of (N, H, W) int labels to `size` = (h, w)."""
  rows = nearest_indices(labels.shape[1], size[0])
  cols = nearest_indices(labels.shape[2], size[1])
  return labels[:, rows][:, :, cols]


def upsample_bilinear(x, size):
  """Bilinear resize of (N, H, W, C) to `size` = (h, w), half-pixel centres.

  Matches `F.interpolate(..., mode="bilinear", align_corners=False)` for up-
  and downsampling (no antialiasing).
  """
  n, _, _, c = x.shape
  # Images stay whole on their device (XLA would otherwise repartition the
  # resize's products with all-to-alls).
  x = sharding.constrain(x, sharding.DATA_AXIS)
  return sharding.constrain(
      jax.image.resize(x, (n, size[0], size[1], c), method="bilinear",
                       antialias=False), sharding.DATA_AXIS)


def cross_entropy(logits, labels, ignore_label=255):
  """Pixel cross-entropy, mean over non-ignored pixels (0 if there are none).

  Args:
    logits: (N, H, W, M).
    labels: (N, H, W) int; `ignore_label` pixels are excluded.

  Returns:
    scalar float32.
  """
  _check_spatial(logits, labels, "logits")
  logp = jax.nn.log_softmax(similarity.at_least_f32(logits), axis=-1)
  valid = labels != ignore_label
  # The label's log-probability as a masked sum over classes: local to
  # each image's device (a gather along the class axis is partitioned with
  # all-gathers).
  classes = jnp.arange(logp.shape[-1], dtype=jnp.int32)
  nll = -jnp.sum(jnp.where(labels[..., None].astype(jnp.int32) == classes,
                           logp, 0.0), axis=-1)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _prefix_sum(x):
  """Cumulative sum over axis 0 as a parallel (associative) scan.

  Not `jnp.cumsum`: it lowers to a reduce-window whose window is the whole
  axis. On one device XLA rewrites that into a scan, but when the axis is
  sharded (the Lovasz runs over the global batch, sharded on `data`) the
  SPMD partitioner keeps the full-length window: O(P^2) work, which made
  the demo update on 2 CPU devices 360x slower (benchmarks/scaling.py, with
  a cumsum). The operands here are 0/1 indicators, so both forms are exact
  in float32.
  """
  return jax.lax.associative_scan(jnp.add, x, axis=0)


def _lovasz_grad(gt_sorted, prefix_sum=_prefix_sum):
  """Gradient of the Lovasz extension of the Jaccard loss, (P, M) columns."""
  gts = jnp.sum(gt_sorted, axis=0, keepdims=True)
  intersection = gts - prefix_sum(gt_sorted)
  union = gts + prefix_sum(1.0 - gt_sorted)
  jaccard = 1.0 - intersection / union
  return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]], axis=0)


def _numpy_descending_order(key):
  """Per column of key (P, M), the rows in descending order (int32).

  The stable order, as XLA's argsort gives it: each float32 is mapped to a
  uint32 of the same order, with its row index in the low 32 bits of a
  uint64, so all keys are distinct and NumPy's (vectorised, unstable) sort
  of them is the stable order of the floats, in half the time of a stable
  float sort.
  """
  neg = np.ascontiguousarray(-np.asarray(key, np.float32).T) + np.float32(0)
  bits = neg.view(np.uint32).astype(np.uint64)  # +0.0 above: no -0.0
  negative = (bits >> np.uint64(31)) == 1
  bits = np.where(negative, bits ^ np.uint64(0xFFFFFFFF),
                  bits | np.uint64(0x80000000))
  rows = np.arange(neg.shape[1], dtype=np.uint64)
  packed = (bits << np.uint64(32)) | rows[None, :]
  packed.sort(axis=1)
  return np.ascontiguousarray(
      (packed & np.uint64(0xFFFFFFFF)).astype(np.int32).T)


# config.loss.lovasz_sort -> `host_sort` of `lovasz_softmax`.
LOVASZ_SORTS = {"auto": None, "host": True, "xla": False}


def host_sort_of(lovasz_sort):
  """`host_sort` for config.loss.lovasz_sort ("auto", "host" or "xla")."""
  if lovasz_sort not in LOVASZ_SORTS:
    raise ValueError(f"config.loss.lovasz_sort={lovasz_sort!r}; expected one "
                     f"of {tuple(LOVASZ_SORTS)}")
  return LOVASZ_SORTS[lovasz_sort]


def descending_order(key, host_sort=None):
  """Per column of key (P, M), the row indices in descending order.

  XLA:CPU's sort is a comparator-driven sort on one thread, about 5x slower
  than NumPy's vectorised sort of packed keys on the Lovasz loss's
  (103041, 16) errors of one 321x321 image (7% of the R101 update,
  benchmarks/step.py --terms=ce,lovasz). On a
  single CPU device (`host_sort=None`: decided from the backend) the order
  therefore comes from NumPy through `jax.pure_callback`; on accelerators
  and on several devices (the errors are sharded there) it is XLA's sort.
  Both give the same, stable order. A program with the host callback is
  never written to JAX's persistent compilation cache (JAX does not cache
  host callbacks), so it compiles afresh in every process;
  `host_sort=False` (config.loss.lovasz_sort="xla") makes it cacheable.
  """
  if host_sort is None:
    host_sort = xla.on_cpu() and xla.target_device_count() == 1
  if not host_sort:
    return jnp.argsort(-key, axis=0)
  with xla.form("host_sort"):
    return jax.pure_callback(
        _numpy_descending_order, jax.ShapeDtypeStruct(key.shape, jnp.int32),
        jax.lax.stop_gradient(key), vmap_method="sequential")


def lovasz_softmax(probs, labels, ignore_label=255, host_sort=None):
  """Lovasz-softmax over the whole batch, averaged over classes present.

  A class counts when it occurs among the non-ignored labels; the loss is 0
  when none does. Ignored pixels take no part.

  Args:
    probs: (N, H, W, M) class probabilities.
    labels: (N, H, W) int.
    host_sort: see `descending_order` (None: decided from the backend).

  Returns:
    scalar float32.
  """
  _check_spatial(probs, labels, "probs")
  m = probs.shape[-1]
  per_class, present = sharding.by_class_column(
      functools.partial(_lovasz_columns, ignore_label=ignore_label,
                        host_sort=host_sort),
      columns=(similarity.at_least_f32(probs.reshape(-1, m)),
               jnp.arange(m, dtype=jnp.int32)[None, :]),
      shared=(labels.reshape(-1),), fill=(0.0, -1))
  return jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)


def _lovasz_columns(p, classes, y, *, ignore_label, host_sort,
                    by_sorting=None):
  """Per class column of p (P, M'), classes (1, M') and the labels y (P,):
  (the Lovasz extension of the class's errors, 1.0 if it is present).

  `by_sorting` (None: in TPU and GPU programs) moves the data with sorts
  only: the labels sort with the errors, and the Jaccard weights of the
  sorted order go back to pixel order by a second sort on the
  permutation, so the loss is a weighted sum of the unsorted errors. The
  other form gathers the errors in sorted order (a gather, and a scatter
  in its gradient). Both are sum_i e_(i) g_i; only the summation order
  differs.
  """
  y = y.astype(jnp.int32)  # gathered across devices as given (uint8)
  valid = (y != ignore_label)[:, None]
  fg = ((y[:, None] == classes) & valid).astype(p.dtype)  # (P, M')
  errors = jnp.where(valid, jnp.abs(fg - p), 0.0)
  # Sort errors descending per class; ignored pixels go last (key -1) and
  # then count 0, so they change neither the order nor the Jaccard prefix.
  key = jnp.where(valid, jax.lax.stop_gradient(errors), -1.0)
  present = (jnp.sum(fg, axis=0) > 0).astype(p.dtype)
  if by_sorting is None:
    by_sorting = not xla.on_cpu()
  if by_sorting:
    rows = jax.lax.broadcasted_iota(jnp.int32, key.shape, 0)
    _, fg_sorted, permutation = jax.lax.sort(
        (-key, fg, rows), dimension=0, num_keys=1, is_stable=True)
    # The rows are the device's own here (whole columns), so XLA's cumsum
    # (a reduce-window XLA rewrites into a tree; CUB on GPU) is not the
    # sharded full-length window `_prefix_sum` avoids, and it compiles
    # into far fewer TPU kernels than the 19-level associative scan.
    weights = _lovasz_grad(fg_sorted, functools.partial(jax.lax.cumsum,
                                                        axis=0))
    _, weights = jax.lax.sort((permutation, weights), dimension=0,
                              num_keys=1)
    return jnp.sum(errors * jax.lax.stop_gradient(weights), axis=0), present
  order = descending_order(key, host_sort)
  errors_sorted = jnp.take_along_axis(errors, order, 0)
  fg_sorted = jnp.take_along_axis(fg, order, 0)
  return jnp.sum(errors_sorted * _lovasz_grad(fg_sorted), axis=0), present


def lsr_loss(logits, lam=10.0):
  """Multi-level label smoothing regulariser, eq. 13.

  r = -mean_c log P_c per pixel; loss = mean((r / lam - 1) * r) with the
  factor (r / lam - 1) stop-gradient.

  Args:
    logits: (N, H, W, M) (stride-8 logits in PLCA).
    lam: lambda.

  Returns:
    scalar float32.
  """
  logp = jax.nn.log_softmax(similarity.at_least_f32(logits), axis=-1)
  r = -jnp.mean(logp, axis=-1)
  return jnp.mean(jax.lax.stop_gradient(r / lam - 1.0) * r)
