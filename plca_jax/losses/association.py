"""Pixel-level cycle association (docs/method.md, Losses).

Every similarity used here has the form D(a_i, b_j) = A_i . B_j + c_i:
- `cos`: A = a / max(|a|, 1e-12), B likewise, c = 0;
- `kl` (negative KL): A = p, B = log(q + 1e-10), c = -sum p log(p + 1e-10),
  so D(p_i, q_j) = -KL(p_i || q_j).
With that, spatial aggregation and both directions of the cycle are one
row-wise kernel: a row of D is a (L,) vector computed from one left pixel and
the whole right image. Rows are processed `chunk_size` at a time
(`jax.lax.scan` over row chunks, each reading its rows straight from the
unpadded (L, C) arrays and writing its outputs into carries), so no L x L
matrix and no padded or stacked copy of an (L, C) array ever exists: peak
memory is O(chunk_size * L + L * C). Both the aggregation and the cycle are fused
custom VJPs (see the comments above `_aggregate_rows` and `_cycle_rows`):
what they keep for the backward pass is O(L * C) per image (the aggregation's
input, or the cycle's gradient) plus a few numbers per row, and their
gradients are matrix products, with no autodiff intermediates.

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
# Blocks of the `cos` aggregation's triangular backward, in chunk sizes
# (_triangle_geometry).
TRIANGLE_BLOCKS = 4
METRICS = ("cos", "kl")


def at_least_f32(x):
  """x in float32, or float64 if it already is (bfloat16 is promoted)."""
  return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def _check_metric(metric):
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


def _chunk_geometry(num_rows, chunk_size):
  """(rows per chunk, number of chunks) for `num_rows` rows."""
  chunk = num_rows if chunk_size is None else min(chunk_size, num_rows)
  if chunk < 1:
    raise ValueError(f"chunk_size={chunk_size}; expected None or >= 1")
  return chunk, -(-num_rows // chunk)


def _row_block(k, chunk, num_rows):
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


def _rows(x, start, chunk):
  """x[start:start + chunk] (dynamic start)."""
  return jax.lax.dynamic_slice_in_dim(x, start, chunk, 0)


def _put_rows(acc, start, rows, fresh):
  """acc[start:start + R] = rows, for the fresh rows only."""
  old = _rows(acc, start, rows.shape[0])
  mask = fresh.reshape((-1,) + (1,) * (rows.ndim - 1))
  return jax.lax.dynamic_update_slice_in_dim(
      acc, jnp.where(mask, rows.astype(acc.dtype), old), start, 0)


def _add_at(acc, start, rows):
  """acc[start:start + R] += rows, in place."""
  old = _rows(acc, start, rows.shape[0])
  return jax.lax.dynamic_update_slice_in_dim(acc, old + rows, start, 0)


def _mean_scale(d, axis):
  """Mean and unbiased std + 1e-10 of d along `axis` (kept as size 1)."""
  mean = jnp.mean(d, axis=axis, keepdims=True)
  var = jnp.sum(jnp.square(d - mean), axis=axis, keepdims=True) / (
      d.shape[axis] - 1)
  return mean, jnp.sqrt(var) + STD_EPS


def _row_stats(d, normalize):
  """Constants of the row softmax of similarity rows d (R, L).

  Returns (mean, scale, lse), each (R, 1), such that the scores are
  softmax(z) = exp(z - lse) with z = (d - mean) / scale: the row mean and
  the unbiased std + 1e-10 for the contrast normalisation (`normalize`;
  stop-gradient quantities; docs/method.md, Losses), mean 0 and scale 1
  otherwise.
  """
  if normalize:
    mean, scale = _mean_scale(d, -1)
  else:
    mean, scale = jnp.zeros_like(d[:, :1]), jnp.ones_like(d[:, :1])
  lse = jax.nn.logsumexp((d - mean) / scale, axis=-1, keepdims=True)
  return mean, scale, lse


def _per_image(fn, *args):
  """jax.vmap(fn)(*args), without the batch axis for a single image.

  XLA:CPU runs a batched (R, C) x (L, C)^T product ~1.4x slower than the
  same product without the batch axis (it transposes the right operand in
  the loop); one image per micro-batch, the paper's setting on one device,
  skips it.
  """
  if args[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], fn(*(a[0] for a in args)))
  return jax.vmap(fn)(*args)


def _pick(x, idx):
  """x[r, idx[r]] for every row r of x (R, L)."""
  return jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]


def _one_hot_minus(idx, probs):
  """one_hot(idx) - probs for rows (R, L)."""
  hot = jnp.arange(probs.shape[1]) == idx[:, None]
  return hot.astype(probs.dtype) - probs


# Operands in scaled form: row i of D(x, y) is ra_i (u_i . v_j) rb_j + c_i,
# i.e. A = diag(ra) u and B = diag(rb) v. For `cos`, u = v = x and
# ra = rb = 1 / max(|x|, 1e-12), so no normalised copy of a feature map is
# ever stored (C = 2048 makes each (L, C) copy 69 MB at 92x92); for `kl`,
# u = p, v = log(q + 1e-10), ra = rb = 1.


def _sq_norm_and_inverse(x):
  """|x_i|^2 and 1 / max(|x_i|, 1e-12) of the rows of x (L, C): (L,) each."""
  sq = jnp.sum(x * x, axis=-1)
  return sq, jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS**2))


def _scaled_operands(x, metric):
  """(u, ra, c, v, rb) of x (L, C); see above."""
  if metric == "cos":
    _, r = _sq_norm_and_inverse(x)
    return x, r, jnp.zeros_like(r), x, r
  ones = jnp.ones(x.shape[:1], x.dtype)
  return (x, ones, -jnp.sum(x * jnp.log(x + KL_EPS), axis=-1),
          jnp.log(x + KL_EPS), ones)


def _operands_grad(x, metric, da, dc, db):
  """Gradient w.r.t. x (L, C) from those w.r.t. A, c and B of x.

  For `cos` (A = B = x / max(|x|, 1e-12)) `da` is None and `db` holds the
  sum of both; written out rather than through jax.vjp, so that no
  cotangent or residual of the size of x is made for the unused parts.
  """
  if metric == "cos":
    sq, r = _sq_norm_and_inverse(x)
    # d/dx (x r) = r I - r^3 x x^T where |x| > 1e-12; r is constant below.
    dr = jnp.where(sq > NORM_EPS**2, r**3 * jnp.sum(x * db, -1), 0.0)
    return r[:, None] * db - dr[:, None] * x
  log = jnp.log(x + KL_EPS)
  # A = p, c = -sum p log(p + eps), B = log(p + eps).
  return (da - dc[:, None] * (log + x / (x + KL_EPS)) + db / (x + KL_EPS))


def _similarity_rows(a_r, c_r, v, rb):
  """Rows of D for the full left operands a_r (R, C): (R, L)."""
  return (a_r @ v.T) * rb[None, :] + c_r[:, None]


# Spatial aggregation (eq. 7-8) of one image as one custom VJP. The forward
# keeps its input (for `cos` its output too) and, per row, the constants of
# the row softmax (mean, scale, log-sum-exp); the backward recomputes each
# block of similarities once and forms every gradient with matrix
# products: 2 (L x L x C) products forward, 3.5 backward for `cos` (below),
# 5 for `kl`. (Autodiff
# through a rematerialised chunk also recomputed W x and kept the softmax's
# intermediates.)


def _aggregate_rows(x, metric, alpha, chunk_size):
  """x (L, C) -> (output (L, C) float32+, row statistics (mean, scale, lse),
  the whole D (L, L) where it is one chunk, else None)."""
  xf = at_least_f32(x)
  u, ra, c, v, rb = _scaled_operands(xf, metric)
  n = xf.shape[0]
  chunk, num_chunks = _chunk_geometry(n, chunk_size)

  def chunk_rows(start):
    u_r, ra_r, c_r, x_r = (_rows(y, start, chunk) for y in (u, ra, c, xf))
    d = _similarity_rows(u_r * ra_r[:, None], c_r, v, rb)
    m, sc, l = _row_stats(d, metric == "cos")
    w = jnp.exp((d - m) / sc - l)
    return (1.0 - alpha) * x_r + alpha * (w @ xf), (m, sc, l), d

  if num_chunks == 1:  # the whole D, also returned
    out, stats, d = chunk_rows(0)
    return out, stats, d

  def body(carry, k):
    out, stats = carry
    start, fresh = _row_block(k, chunk, n)
    rows, row_stats, _ = chunk_rows(start)
    return (_put_rows(out, start, rows, fresh),
            tuple(_put_rows(acc, start, y, fresh)
                  for acc, y in zip(stats, row_stats))), None

  column = jnp.zeros((n, 1), xf.dtype)
  (out, stats), _ = jax.lax.scan(
      body, (jnp.zeros_like(xf), (column,) * 3), jnp.arange(num_chunks))
  return out, stats, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _aggregate_single(x, metric, alpha, chunk_size):
  return _aggregate_rows(x, metric, alpha, chunk_size)[0]


def _aggregate_fwd(x, metric, alpha, chunk_size):
  out, stats, d = _aggregate_rows(x, metric, alpha, chunk_size)
  # x in its own dtype (bfloat16 stays bfloat16); `cos` also keeps the
  # output, from which its backward reads the rows' sum_j w_ij dw_ij, and,
  # where D is one chunk (small images), D itself: its backward then forms
  # 3 (L x L x C) products instead of 4.
  if metric != "cos":
    return out, (x, None, stats, None)
  return out, (x, out, stats, d)


def _aggregate_bwd(metric, alpha, chunk_size, res, g):
  x, out, stats, d = res
  if metric == "cos":
    return (_aggregate_bwd_cos(alpha, chunk_size, x, out, stats, g, d),)
  return (_aggregate_bwd_kl(alpha, chunk_size, x, stats, g),)


# For `cos` both operands are x^ = diag(r) x and D = x^ x^T is symmetric,
# so the backward walks the blocks (k, m), k <= m, of the upper triangle of
# D (blocks of R rows, _triangle_geometry) and forms both D_km and
# D_mk = D_km^T from one product. With dw_ij = dL/dw_ij = alpha g_i . x_j
# and the row sums rho_i = sum_j w_ij dw_ij = g_i . (out_i - (1 - alpha) x_i)
# (closed form, from the output kept by the forward), dd = dL/dD has
#   dd_ij = w_ij (dw_ij - rho_i) / scale_i,
# and the gradient w.r.t. x^ is E x^ with E = dd + dd^T, which is again
# symmetric: block (k, m) gives E_km x^_m to rows k and E_km^T x^_k to rows
# m. The direct term W^T (alpha g) is accumulated alongside, divided by r:
#   acc_j = (E x^)_j + (W^T alpha g)_j / r_j,
# each side one product of stacked operands, [E_km, W_mk^T / r_k] times
# [x^_m; alpha g_m]. Per pair of blocks: [x^_k; alpha g_k] x_m^T (B_km and
# dw_km), alpha g_m x_k^T (dw_mk) and the two sides, 7 (R x R x C) products
# for two blocks of D where the row-by-row form took 10 (3.5 L x L x C
# products instead of 5). The normalisation's projection then reads
# x_j . dx^_j = x_j . acc_j - (sum_i w_ij dw_ij) / r_j, with the column sums
# accumulated in the same pass. Rows a block shares with an earlier one (the
# last block ends at the last row) are masked out of W, so every (i, j)
# counts once. A diagonal block (k = m) is its own transpose: one side,
# 4 products (a separate scan).


def _triangle_geometry(num_rows, chunk_size):
  """(rows per block, number of blocks) of the triangular backward.

  Only (R x R) blocks of D live there, against (chunk_size x L) rows in the
  forward pass, so its blocks are about TRIANGLE_BLOCKS x chunk_size rows:
  fewer, larger products. Their size is balanced (a multiple of 8 above 8
  rows) so that the last block overlaps its predecessor by few rows.
  Measured for the aggregation's forward + backward at 92x92, C=2048,
  chunk 256, in one process, alternating (medians of 3): 8.37 s with the
  row-by-row backward; 7.24 s with blocks of 2 chunks (~512 rows), 6.96 s
  with 4 (944 rows, TRIANGLE_BLOCKS), 6.94 s with 8 (1696 rows; its XLA
  temporaries 170 MB).
  """
  if chunk_size is None:
    return _chunk_geometry(num_rows, None)
  _, num_blocks = _chunk_geometry(num_rows, TRIANGLE_BLOCKS * chunk_size)
  block = -(-num_rows // num_blocks)
  if block > 8:
    block = -(-block // 8) * 8
  return _chunk_geometry(num_rows, min(block, num_rows))


def _aggregate_bwd_cos(alpha, chunk_size, x, out, stats, g, d=None):
  """Gradient w.r.t. x (L, C) of the `cos` aggregation, cotangent g; `d`,
  the forward's whole D where it was one chunk, else None."""
  mean, scale, lse = (y[:, 0] for y in stats)
  xf = at_least_f32(x)
  gf = g.astype(xf.dtype)
  sq, r = _sq_norm_and_inverse(xf)
  n = xf.shape[0]
  block, num_blocks = _triangle_geometry(n, chunk_size)
  if d is not None and num_blocks != 1:
    raise ValueError(f"D given for {num_blocks} blocks; expected one")
  # Two plain reductions: a scalar inside one made XLA:CPU materialise an
  # (L, C) broadcast of it, alive from the start of the program.
  rho = (jnp.sum(gf * out.astype(xf.dtype), -1) -
         (1.0 - alpha) * jnp.sum(gf * xf, -1))

  def side(b):
    """Block b's rows: start, fresh, x, r, [x^; alpha g] (2R, C), stats."""
    start, fresh = _row_block(b, block, n)
    x_b, r_b, g_b, mean_b, scale_b, lse_b, rho_b = (
        _rows(y, start, block) for y in (xf, r, gf, mean, scale, lse, rho))
    stacked = jnp.concatenate([x_b * r_b[:, None], alpha * g_b], axis=0)
    return start, fresh, x_b, r_b, stacked, (mean_b, scale_b, lse_b, rho_b)

  def scores(d, dw, stats_b, mask):
    """W and dd of a block of D from its rows' statistics."""
    mean_b, scale_b, lse_b, rho_b = (y[:, None] for y in stats_b)
    w = jnp.where(mask, jnp.exp((d - mean_b) / scale_b - lse_b), 0.0)
    return w, w * (dw - rho_b) / scale_b

  def pair(carry, km):
    """Blocks (k, m) and (m, k), k < m."""
    acc, wdw = carry
    sk, fk, xk, rk, stacked_k, stats_k = side(km[0])
    sm, fm, xm, rm, stacked_m, stats_m = side(km[1])
    top = stacked_k @ xm.T  # (2R, R)
    d_km, dw_km = top[:block] * rm[None, :], top[block:]  # x^_k x^_m^T
    dw_mk = stacked_m[block:] @ xk.T  # alpha g_m x_k^T
    mask = fk[:, None] & fm[None, :]
    w_km, dd_km = scores(d_km, dw_km, stats_k, mask)
    w_mk, dd_mk = scores(d_km.T, dw_mk, stats_m, mask.T)
    e = dd_km + dd_mk.T
    to_k = jnp.concatenate([e, w_mk.T / rk[:, None]], axis=1) @ stacked_m
    to_m = jnp.concatenate([e.T, w_km.T / rm[:, None]], axis=1) @ stacked_k
    acc = _add_at(_add_at(acc, sk, to_k), sm, to_m)
    wdw = _add_at(_add_at(wdw, sm, jnp.sum(w_km * dw_km, 0)), sk,
                  jnp.sum(w_mk * dw_mk, 0))
    return (acc, wdw), None

  def diagonal(carry, k):
    """Block (k, k): one side, 4 (R x R x C) products."""
    acc, wdw = carry
    sk, fk, xk, rk, stacked_k, stats_k = side(k)
    if d is None:
      top = stacked_k @ xk.T  # (2R, R)
      d_kk, dw = top[:block] * rk[None, :], top[block:]
    else:  # one block: D is the forward's
      d_kk, dw = d, stacked_k[block:] @ xk.T
    w, dd = scores(d_kk, dw, stats_k, fk[:, None] & fk[None, :])
    to_k = jnp.concatenate([dd + dd.T, w.T / rk[:, None]], axis=1) @ stacked_k
    return (_add_at(acc, sk, to_k), _add_at(wdw, sk, jnp.sum(w * dw, 0))), None

  carry = (jnp.zeros_like(xf), jnp.zeros((n,), xf.dtype))
  carry, _ = jax.lax.scan(diagonal, carry, jnp.arange(num_blocks))
  if num_blocks > 1:
    pairs = jnp.stack(jnp.triu_indices(num_blocks, k=1), axis=-1)  # k < m
    carry, _ = jax.lax.scan(pair, carry, pairs)
  acc, wdw = carry
  # dx = (1 - a) g + W^T g + r (dx^ - (x^ . dx^) x^), the projection only
  # where |x| > 1e-12 (r is constant below).
  x_dxhat = jnp.sum(xf * acc, -1) - wdw / r
  dr = jnp.where(sq > NORM_EPS**2, r**3 * x_dxhat, 0.0)
  dx = (1.0 - alpha) * gf + r[:, None] * acc - dr[:, None] * xf
  return dx.astype(x.dtype)


def _aggregate_bwd_kl(alpha, chunk_size, x, stats, g):
  """Gradient w.r.t. x (L, C) of the `kl` aggregation, cotangent g."""
  mean, scale, lse = stats
  xf = at_least_f32(x)
  u, _, c, v, rb = _scaled_operands(xf, "kl")
  n = xf.shape[0]
  chunk, num_chunks = _chunk_geometry(n, chunk_size)

  def body(carry, k):
    dx, da, db, dc = carry
    start, fresh = _row_block(k, chunk, n)
    u_r, c_r, mean_r, scale_r, lse_r = (
        _rows(y, start, chunk) for y in (u, c, mean, scale, lse))
    # Rows an earlier chunk had contribute nothing.
    g_r = alpha * _rows(g, start, chunk).astype(xf.dtype) * fresh[:, None]
    w = jnp.exp((_similarity_rows(u_r, c_r, v, rb) - mean_r) / scale_r
                - lse_r)  # W rows, recomputed once
    dw = g_r @ xf.T  # dL/dW, (R, L)
    dd = w * (dw - jnp.sum(w * dw, axis=-1, keepdims=True)) / scale_r
    return (dx + w.T @ g_r, _add_at(da, start, dd @ v), db + dd.T @ u_r,
            _add_at(dc, start, jnp.sum(dd, -1))), None

  zeros = jnp.zeros_like(xf)
  (dx, da, db, dc), _ = jax.lax.scan(
      body, (zeros, zeros, zeros, jnp.zeros((n,), xf.dtype)),
      jnp.arange(num_chunks))
  dx_operands = _operands_grad(xf, "kl", da, dc, db)
  return ((1.0 - alpha) * g + dx + dx_operands).astype(x.dtype)


_aggregate_single.defvjp(_aggregate_fwd, _aggregate_bwd)


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
  fn = functools.partial(_aggregate_single, metric=metric, alpha=alpha,
                         chunk_size=chunk_size)
  return _per_image(fn, x.reshape(n, h * w, ch)).reshape(n, h, w, ch)


@jax.custom_vjp
def bce_positive(x):
  """-log(x) like torch's BCELoss with target 1: log clamped at -100.

  The gradient is torch's (x - 1) / max(x (1 - x), 1e-12): -1/x in the
  interior and exactly 0 at x = 1.
  """
  return -jnp.maximum(jnp.log(x), -100.0)


def _bce_grad(x):
  return (x - 1.0) / jnp.maximum(x * (1.0 - x), 1e-12)


bce_positive.defvjp(lambda x: (bce_positive(x), x),
                    lambda x, g: (g * _bce_grad(x),))


# The cycle association of one image pair as one custom VJP. Its output that
# carries a gradient is the scalar sum of the per-pixel losses over the
# selected source pixels, so the gradient is that of a scalar: the forward
# pass forms it alongside the loss and keeps only it (the size of the
# inputs) for the backward pass, which scales it by the incoming cotangent.
# Sim-PLCA (loss -(D_st + D_ts) on the raw similarities) has u = -1 below
# and no softmax.
#
# `cos` (L_fass): D_ts = D_st^T, so the rows of D_ts are the columns of
# D_st and every row of D_ts is met once, as a column, while sweeping the
# rows of D_st; nothing is computed per (i, j*(i)) pair. The column mean and
# unbiased std of D_st (the detached statistics of the D_ts rows) have
# closed forms, mean_j = t^_j . mean_i(s^_i) and var_j = t^_j^T Cov(s^) t^_j
# (Cov from the centred source, accumulated over row chunks: no
# cancellation between a second moment and a squared mean), 2 L C^2
# multiply-adds, a quarter of one (L x L x C) product each at 92x92,
# C = 2048. Knowing them before the sweep, one sweep over the rows of D_st
# gives the rows' statistics, j*, and, per column, the running max (i*, the
# first index on ties) and the running log-sum-exp of the column scores.
# The loss follows; a second sweep recomputes D_st rows and forms
#   dL/dD(i, j) = u_i / sd_i (one_hot_j*(i) - S_st(i, j))
#               + U_j / sd'_j (one_hot_i*(j) - S_ts(j, i)),
# U_j = sum of u_i over the i with j*(i) = j, u = dL/dp * p (p = S_st S_ts,
# torch's BCE gradient), and the operands' gradients with 2 products:
# 4.5 (L x L x C) products in all, where the D_ts rows at j* took 6.
#
# `kl` (L_cass): D_ts(j, i) = -KL(q_j || p_i) is no transpose of D_st. Per
# chunk of source rows i: D_st(i, :), j*, S_st(i, j*); D_ts(j*, :), i*,
# S_ts(j*, i*); loss; dL/dD_st(i, :) = u (one_hot(j*) - S_st(i, :)) / sd,
# likewise for D_ts(j*, :); then 4 products give the operands' gradients:
# 6 (L x L x M) products, cheap at M = 16 classes.


def _cos_column_stats(s, rs, t, rt, chunk_size):
  """Detached column mean and scale (std + 1e-10) of D_st = s^ t^^T.

  s (Ls, C) and t (Lt, C) with their inverse norms rs, rt: (Lt,) each.
  """
  ns, nt = s.shape[0], t.shape[0]
  mu = jnp.mean(s * rs[:, None], axis=0)  # (C,)
  chunk, num_chunks = _chunk_geometry(ns, chunk_size)

  def gram(acc, k):
    start, fresh = _row_block(k, chunk, ns)
    a_r = _rows(s, start, chunk) * _rows(rs, start, chunk)[:, None] - mu
    a_r = a_r * fresh[:, None]
    return acc + a_r.T @ a_r, None

  cov, _ = jax.lax.scan(gram, jnp.zeros((s.shape[1],) * 2, s.dtype),
                        jnp.arange(num_chunks))
  cov = cov / (ns - 1)
  chunk_t, num_chunks_t = _chunk_geometry(nt, chunk_size)

  def quad(acc, k):
    start, fresh = _row_block(k, chunk_t, nt)
    t_r = _rows(t, start, chunk_t)
    return _put_rows(acc, start, jnp.sum((t_r @ cov) * t_r, -1), fresh), None

  q, _ = jax.lax.scan(quad, jnp.zeros((nt,), s.dtype),
                      jnp.arange(num_chunks_t))
  var = jnp.maximum(q, 0.0) * rt * rt
  return rt * (t @ mu), jnp.sqrt(var) + STD_EPS


def _cos_cycle_rows(s, t, labels, ignore_label, chunk_size, sim_plca,
                    with_grads):
  """The `cos` cycle of one pair s (Ls, C), t (Lt, C), labels (Ls,)."""
  sf, tf = at_least_f32(s), at_least_f32(t)
  dtype = sf.dtype
  _, rs = _sq_norm_and_inverse(sf)
  _, rt = _sq_norm_and_inverse(tf)
  valid = labels != ignore_label
  ns, nt = sf.shape[0], tf.shape[0]
  chunk, num_chunks = _chunk_geometry(ns, chunk_size)

  def d_rows(start):
    a_r = _rows(sf, start, chunk) * _rows(rs, start, chunk)[:, None]
    return a_r, (a_r @ tf.T) * rt[None, :]  # D_st rows, (R, Lt)

  if num_chunks == 1:
    # One chunk: D_st is formed once and read by both sweeps, and its
    # column statistics come straight from it (3 products, not 6.4 at
    # 41x41, C = 2048).
    dense = d_rows(0)
    d_rows = lambda start: dense  # pylint: disable=function-redefined
  if sim_plca:
    col_mean, col_scale = jnp.zeros((nt,), dtype), jnp.ones((nt,), dtype)
  elif num_chunks == 1:
    col_mean, col_scale = (y[0] for y in _mean_scale(dense[1], 0))
  else:
    col_mean, col_scale = _cos_column_stats(sf, rs, tf, rt, chunk_size)

  def sweep(carry, k):
    rows, cmax, carg, csum = carry
    start, fresh = _row_block(k, chunk, ns)
    _, d = d_rows(start)
    j = jnp.argmax(d, axis=1)  # first index on ties
    if sim_plca:
      row_out = (j, _pick(d, j), jnp.zeros_like(d[:, 0]),
                 jnp.ones_like(d[:, 0]), jnp.zeros_like(d[:, 0]))
    else:
      mean, scale, lse = _row_stats(d, True)
      row_out = (j, _pick((d - mean) / scale, j) - lse[:, 0], mean[:, 0],
                 scale[:, 0], lse[:, 0])
    rows = tuple(_put_rows(acc, start, v, fresh)
                 for acc, v in zip(rows, row_out))
    # Columns: rows an earlier chunk had are left out.
    d = jnp.where(fresh[:, None], d, -jnp.inf)
    chunk_max = jnp.max(d, axis=0)
    better = chunk_max > cmax  # strict: an earlier row keeps a tie
    carg = jnp.where(better, start + jnp.argmax(d, axis=0), carg).astype(
        jnp.int32)
    new_max = jnp.maximum(cmax, chunk_max)
    if not sim_plca:  # running sum of exp(z - z_max) down each column
      zmax = (new_max - col_mean) / col_scale
      csum = (csum * jnp.exp((cmax - col_mean) / col_scale - zmax) +
              jnp.sum(jnp.exp((d - col_mean) / col_scale - zmax), axis=0))
    return (rows, new_max, carg, csum), None

  zeros_s = jnp.zeros((ns,), dtype)
  init = ((jnp.zeros((ns,), jnp.int32),) + (zeros_s,) * 4,
          jnp.full((nt,), -jnp.inf, dtype), jnp.zeros((nt,), jnp.int32),
          jnp.zeros((nt,), dtype))
  (rows, cmax, i_of_j, csum), _ = jax.lax.scan(sweep, init,
                                                jnp.arange(num_chunks))
  j_star, pick_st, mean, scale, lse = rows
  i_star = i_of_j[j_star]
  selected = valid & (labels[i_star] == labels)
  if sim_plca:
    loss = -(pick_st + cmax[j_star])
  else:
    col_lse = (cmax - col_mean) / col_scale + jnp.log(csum)
    p = jnp.exp(pick_st) / csum[j_star]  # S_st(i, j*) S_ts(j*, i*)
    loss = bce_positive(p)
  loss_sum = jnp.sum(jnp.where(selected, loss, 0.0))
  result = (loss_sum, loss, j_star, i_star, valid, selected)
  if not with_grads:
    return result, None

  w = selected.astype(dtype)
  u = -w if sim_plca else w * _bce_grad(p) * p  # dL/dlog p, per source row
  big_u = jnp.zeros((nt,), dtype).at[j_star].add(u)  # per column j

  def grads(carry, k):
    ds_hat, dt_hat = carry
    start, fresh = _row_block(k, chunk, ns)
    a_r, d = d_rows(start)
    j_r, u_r, mean_r, scale_r, lse_r = (
        _rows(y, start, chunk) for y in (j_star, u, mean, scale, lse))
    rows_idx = start + jnp.arange(chunk)
    hot_row = (jnp.arange(nt) == j_r[:, None]).astype(dtype)
    hot_col = (rows_idx[:, None] == i_of_j[None, :]).astype(dtype)
    if sim_plca:
      g = u_r[:, None] * hot_row + big_u[None, :] * hot_col
    else:
      s_st = jnp.exp((d - mean_r[:, None]) / scale_r[:, None] - lse_r[:, None])
      s_ts = jnp.exp((d - col_mean) / col_scale - col_lse)
      g = ((u_r / scale_r)[:, None] * (hot_row - s_st) +
           (big_u / col_scale)[None, :] * (hot_col - s_ts))
    g = g * fresh[:, None].astype(dtype)  # rows an earlier chunk had
    ds_hat = _add_at(ds_hat, start, (g * rt[None, :]) @ tf)
    return (ds_hat, dt_hat + g.T @ a_r), None

  (ds_hat, dt_hat), _ = jax.lax.scan(
      grads, (jnp.zeros_like(sf), jnp.zeros_like(tf)), jnp.arange(num_chunks))
  ds = _operands_grad(sf, "cos", None, None, ds_hat)
  dt = _operands_grad(tf, "cos", None, None, dt_hat)
  return result, (ds.astype(s.dtype), dt.astype(t.dtype))


def _cycle_rows(s, t, labels, metric, ignore_label, chunk_size, sim_plca,
                with_grads):
  """One pair s (Ls, C), t (Lt, C), labels (Ls,): outputs and gradients."""
  if metric == "cos":
    return _cos_cycle_rows(s, t, labels, ignore_label, chunk_size, sim_plca,
                           with_grads)
  sf, tf = at_least_f32(s), at_least_f32(t)
  u_s, _, c_s, v_s, _ = _scaled_operands(sf, metric)
  u_t, _, c_t, v_t, _ = _scaled_operands(tf, metric)
  valid = labels != ignore_label
  dtype = sf.dtype

  def scores(d, idx):
    """Rows d (R, L): S[r, idx[r]], the score rows S and their scale."""
    mean, scale, lse = _row_stats(d, True)
    z = (d - mean) / scale
    return jnp.exp(_pick(z, idx) - lse[:, 0]), jnp.exp(z - lse), scale

  n = sf.shape[0]
  chunk, num_chunks = _chunk_geometry(n, chunk_size)

  def body(carry, k):
    outs, grads = carry
    start, fresh = _row_block(k, chunk, n)
    a_r, c_r, y_r, valid_r = (
        _rows(y, start, chunk) for y in (u_s, c_s, labels, valid))
    d_st = a_r @ v_t.T + c_r[:, None]  # D_st(i, :), (R, Lt)
    j = jnp.argmax(d_st, axis=1)  # first index on ties
    a_j = u_t[j]
    d_ts = a_j @ v_s.T + c_t[j][:, None]  # D_ts(j*, :), (R, Ls)
    i_back = jnp.argmax(d_ts, axis=1)
    selected = valid_r & (labels[i_back] == y_r)
    if sim_plca:
      loss = -(_pick(d_st, j) + _pick(d_ts, i_back))
    else:
      p_st, probs_st, scale_st = scores(d_st, j)
      p_ts, probs_ts, scale_ts = scores(d_ts, i_back)
      p = p_st * p_ts
      loss = bce_positive(p)
    outs = tuple(_put_rows(acc, start, rows, fresh) for acc, rows in
                 zip(outs, (loss, j, i_back, selected)))
    if not with_grads:
      return (outs, grads), None
    # Rows an earlier chunk had contribute nothing.
    w = (selected & fresh).astype(dtype)
    if sim_plca:
      g_st = -w[:, None] * _one_hot_minus(j, jnp.zeros_like(d_st))
      g_ts = -w[:, None] * _one_hot_minus(i_back, jnp.zeros_like(d_ts))
    else:
      u = (w * _bce_grad(p) * p)[:, None]
      g_st = u * _one_hot_minus(j, probs_st) / scale_st
      g_ts = u * _one_hot_minus(i_back, probs_ts) / scale_ts
    da_s, db_s, dc_s, da_t, db_t, dc_t = grads
    return (outs, (_add_at(da_s, start, g_st @ v_t), db_s + g_ts.T @ a_j,
                   _add_at(dc_s, start, jnp.sum(g_st, -1)),
                   da_t.at[j].add(g_ts @ v_s), db_t + g_st.T @ a_r,
                   dc_t.at[j].add(jnp.sum(g_ts, -1)))), None

  outs = (jnp.zeros((n,), dtype), jnp.zeros((n,), jnp.int32),
          jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool))
  grads = None
  if with_grads:
    zeros_s, zeros_t = jnp.zeros_like(sf), jnp.zeros_like(tf)
    grads = (zeros_s, zeros_s, jnp.zeros((n,), dtype), zeros_t, zeros_t,
             jnp.zeros_like(c_t))
  (outs, grads), _ = jax.lax.scan(body, (outs, grads),
                                  jnp.arange(num_chunks))
  loss, j_star, i_star, selected = outs
  loss_sum = jnp.sum(jnp.where(selected, loss, 0.0))
  result = (loss_sum, loss, j_star, i_star, valid, selected)
  if not with_grads:
    return result, None
  da_s, db_s, dc_s, da_t, db_t, dc_t = grads
  ds = _operands_grad(sf, metric, da_s, dc_s, db_s)
  dt = _operands_grad(tf, metric, da_t, dc_t, db_t)
  return result, (ds.astype(s.dtype), dt.astype(t.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _cycle_single(s, t, labels, metric, ignore_label, chunk_size, sim_plca):
  return _cycle_rows(s, t, labels, metric, ignore_label, chunk_size,
                     sim_plca, with_grads=False)[0]


def _cycle_fwd(s, t, labels, metric, ignore_label, chunk_size, sim_plca):
  return _cycle_rows(s, t, labels, metric, ignore_label, chunk_size,
                     sim_plca, with_grads=True)


def _cycle_bwd(metric, ignore_label, chunk_size, sim_plca, grads, ct):
  del metric, ignore_label, chunk_size, sim_plca
  # Only the summed loss carries a gradient; the per-pixel outputs are
  # diagnostics (cycle_association returns them stop-gradient).
  ct_sum = ct[0]
  ds, dt = grads
  return ((ct_sum * ds).astype(ds.dtype), (ct_sum * dt).astype(dt.dtype),
          None)


_cycle_single.defvjp(_cycle_fwd, _cycle_bwd)


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
    dict: "mean_loss", the association loss (mean of the per-pixel loss
    over the selected source pixels of the whole batch, 0 if there are
    none), the one output that carries a gradient; and (N, Hs*Ws) arrays:
    "loss" (per source pixel, before masking; stop-gradient), "j_star",
    "i_star" (int32 indices into the flattened target / source grids),
    "valid" and "selected" (bool), and "source_labels" (the labels given,
    flattened).
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
  y = jnp.asarray(source_labels).reshape(n, hs * ws)
  fn = functools.partial(_cycle_single, metric=metric,
                         ignore_label=ignore_label, chunk_size=chunk_size,
                         sim_plca=sim_plca)
  loss_sum, loss, j_star, i_star, valid, selected = _per_image(
      fn, source.reshape(n, hs * ws, ch), target.reshape(n, -1, ch), y)
  count = jnp.maximum(jnp.sum(selected), 1).astype(loss_sum.dtype)
  return dict(mean_loss=jnp.sum(loss_sum) / count,
              loss=jax.lax.stop_gradient(loss), j_star=j_star, i_star=i_star,
              valid=valid, selected=selected, source_labels=y)


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
  return cycle_association(
      source, target, source_labels, metric,
      aggregate_target=aggregate_target, alpha=alpha,
      ignore_label=ignore_label, chunk_size=chunk_size)["mean_loss"]
