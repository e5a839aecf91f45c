"""Similarity rows of one image pair, a chunk of rows at a time.

Every similarity used by the association has the form
D(a_i, b_j) = A_i . B_j + c_i:
- `cos`: A = a / max(|a|, 1e-12), B likewise, c = 0;
- `kl` (negative KL): A = p, B = log(q + 1e-10), c = -sum p log(p + 1e-10),
  so D(p_i, q_j) = -KL(p_i || q_j).
With that, spatial aggregation (`aggregation`) and both directions of the
cycle (`cos_cycle`, `kl_cycle`) are row-wise kernels: a row of D is a (L,)
vector computed from one left pixel and the whole right image. Rows are
processed `chunk_size` at a time (`jax.lax.scan` over row chunks, each
reading its rows straight from the unpadded (L, C) arrays and writing its
outputs into carries), so no L x L matrix and no padded or stacked copy of
an (L, C) array ever exists: peak memory is O(chunk_size * L + L * C).
This module holds what they share: the operands, the row statistics of
the softmax, the chunk geometry, and torch's BCE for the cycle's loss. All
functions work on one image, (L, C) pixel sets; computation is in float32
for float32/bfloat16 inputs (float64 inputs stay float64, which the tests
use).
"""

import jax
import jax.numpy as jnp


KL_EPS = 1e-10
NORM_EPS = 1e-12
STD_EPS = 1e-10
METRICS = ("cos", "kl")


# config.loss.association_precision: how TPUs and GPUs run the float32
# products of the association and aggregation. "default" lets the backend
# choose (TPU: one bfloat16 pass; NVIDIA since Ampere: TF32), "high" (TPU:
# three bfloat16 passes), "highest" (float32). CPUs compute in float32
# whatever the setting. docs/method.md, Deviations, has
# the figures behind the default.
PRECISIONS = ("default", "high", "highest")


def products_precision(name):
  """Context in which the matrix products traced get precision `name`."""
  if name not in PRECISIONS:
    raise ValueError(f"config.loss.association_precision={name!r}; "
                     f"expected one of {PRECISIONS}")
  return jax.default_matmul_precision(name)


def at_least_f32(x):
  """x in float32, or float64 if it already is (bfloat16 is promoted)."""
  return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def check_metric(metric):
  if metric not in METRICS:
    raise ValueError(f"metric={metric!r}; expected one of {METRICS}")


def contrast_normalize(d):
  """Softmax of (d - mean) / (std + 1e-10) over the last axis.

  mean and unbiased std are stop-gradient (the release's `scoring`).
  """
  d_sg = jax.lax.stop_gradient(d)
  mean = jnp.mean(d_sg, axis=-1, keepdims=True)
  std = jnp.std(d_sg, axis=-1, keepdims=True, ddof=1)
  return jax.nn.softmax((d - mean) / (std + STD_EPS), axis=-1)


def chunk_for(chunk_size, chunk_above_pixels, *maps):
  """The chunk size to run an association of the (N, H, W, C) `maps` with.

  `chunk_size` (None: unchunked) where one of the maps has more than
  `chunk_above_pixels` pixels (H * W), else None: below that, the whole
  (L x L) matrices are small and one chunk is faster (`config.loss.
  chunk_above_pixels`; benchmarks/association.py).
  """
  pixels = max(m.shape[1] * m.shape[2] for m in maps)
  return chunk_size if pixels > chunk_above_pixels else None


def chunk_geometry(num_rows, chunk_size):
  """(rows per chunk, number of chunks) for `num_rows` rows."""
  chunk = num_rows if chunk_size is None else min(chunk_size, num_rows)
  if chunk < 1:
    raise ValueError(f"chunk_size={chunk_size}; expected None or >= 1")
  return chunk, -(-num_rows // chunk)


def row_block(k, chunk, num_rows):
  """Chunk k's rows: (start, fresh).

  Rows [start, start + chunk) are read straight from the unpadded arrays:
  start = min(k chunk, num_rows - chunk), so the last chunk ends at the last
  row and may overlap its predecessor; `fresh` (chunk,) marks the rows no
  earlier chunk had. Outputs take only fresh rows and gradient
  contributions of the others are zeroed, so no padded copy of an (L, C)
  array is ever made.
  """
  start = jnp.minimum(k * chunk, num_rows - chunk)
  return start, start + jnp.arange(chunk) >= k * chunk


def take_rows(x, start, chunk):
  """x[start:start + chunk] (dynamic start)."""
  return jax.lax.dynamic_slice_in_dim(x, start, chunk, 0)


def put_rows(acc, start, rows, fresh):
  """acc[start:start + R] = rows, for the fresh rows only."""
  old = take_rows(acc, start, rows.shape[0])
  mask = fresh.reshape((-1,) + (1,) * (rows.ndim - 1))
  return jax.lax.dynamic_update_slice_in_dim(
      acc, jnp.where(mask, rows.astype(acc.dtype), old), start, 0)


def add_at(acc, start, rows):
  """acc[start:start + R] += rows, in place."""
  old = take_rows(acc, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(acc, old + rows, start, 0)


def mean_scale(d, axis):
  """Mean and unbiased std + 1e-10 of d along `axis` (kept as size 1)."""
  mean = jnp.mean(d, axis=axis, keepdims=True)
  var = jnp.sum(jnp.square(d - mean), axis=axis, keepdims=True) / (
      d.shape[axis] - 1)
  return mean, jnp.sqrt(var) + STD_EPS


def row_stats(d, normalize):
  """Constants of the row softmax of similarity rows d (R, L).

  Returns (mean, scale, lse), each (R, 1), such that the scores are
  softmax(z) = exp(z - lse) with z = (d - mean) / scale: the row mean and
  the unbiased std + 1e-10 for the contrast normalisation (`normalize`;
  stop-gradient quantities; docs/method.md, Losses), mean 0 and scale 1
  otherwise.
  """
  if normalize:
    mean, scale = mean_scale(d, -1)
  else:
    mean, scale = jnp.zeros_like(d[:, :1]), jnp.ones_like(d[:, :1])
  lse = jax.nn.logsumexp((d - mean) / scale, axis=-1, keepdims=True)
  return mean, scale, lse


def per_image(fn, *args):
  """jax.vmap(fn)(*args), without the batch axis for a single image.

  XLA:CPU runs a batched (R, C) x (L, C)^T product ~1.4x slower than the
  same product without the batch axis (it transposes the right operand in
  the loop); one image per micro-batch, the paper's setting on one device,
  skips it.
  """
  if args[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], fn(*(a[0] for a in args)))
  return jax.vmap(fn)(*args)


def pick(x, idx):
  """x[r, idx[r]] for every row r of x (R, L)."""
  return jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]


def one_hot_minus(idx, probs):
  """one_hot(idx) - probs for rows (R, L)."""
  hot = jnp.arange(probs.shape[1]) == idx[:, None]
  return hot.astype(probs.dtype) - probs


# Operands in scaled form: row i of D(x, y) is ra_i (u_i . v_j) rb_j + c_i,
# i.e. A = diag(ra) u and B = diag(rb) v. For `cos`, u = v = x and
# ra = rb = 1 / max(|x|, 1e-12), so no normalised copy of a feature map is
# ever stored (C = 2048 makes each (L, C) copy 69 MB at 92x92); for `kl`,
# u = p, v = log(q + 1e-10), ra = rb = 1.


def sq_norm_and_inverse(x):
  """|x_i|^2 and 1 / max(|x_i|, 1e-12) of the rows of x (L, C): (L,) each."""
  sq = jnp.sum(x * x, axis=-1)
  return sq, jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS**2))


def scaled_operands(x, metric):
  """(u, ra, c, v, rb) of x (L, C); see above."""
  if metric == "cos":
    _, r = sq_norm_and_inverse(x)
    return x, r, jnp.zeros_like(r), x, r
  ones = jnp.ones(x.shape[:1], x.dtype)
  return (x, ones, -jnp.sum(x * jnp.log(x + KL_EPS), axis=-1),
          jnp.log(x + KL_EPS), ones)


def operands_grad(x, metric, da, dc, db):
  """Gradient w.r.t. x (L, C) from those w.r.t. A, c and B of x.

  For `cos` (A = B = x / max(|x|, 1e-12)) `da` is None and `db` holds the
  sum of both; written out rather than through jax.vjp, so that no
  cotangent or residual of the size of x is made for the unused parts.
  """
  if metric == "cos":
    sq, r = sq_norm_and_inverse(x)
    # d/dx (x r) = r I - r^3 x x^T where |x| > 1e-12; r is constant below.
    dr = jnp.where(sq > NORM_EPS**2, r**3 * jnp.sum(x * db, -1), 0.0)
    return r[:, None] * db - dr[:, None] * x
  log = jnp.log(x + KL_EPS)
  # A = p, c = -sum p log(p + eps), B = log(p + eps).
  return (da - dc[:, None] * (log + x / (x + KL_EPS)) + db / (x + KL_EPS))


def similarity_rows(a_r, c_r, v, rb):
  """Rows of D for the full left operands a_r (R, C): (R, L)."""
  return (a_r @ v.T) * rb[None, :] + c_r[:, None]


@jax.custom_vjp
def bce_positive(x):
  """-log(x) like torch's BCELoss with target 1: log clamped at -100.

  The gradient is torch's (x - 1) / max(x (1 - x), 1e-12): -1/x in the
  interior and exactly 0 at x = 1.
  """
  return -jnp.maximum(jnp.log(x), -100.0)


def bce_grad(x):
  return (x - 1.0) / jnp.maximum(x * (1.0 - x), 1e-12)


bce_positive.defvjp(lambda x: (bce_positive(x), x),
                    lambda x, g: (g * bce_grad(x),))
