"""Spatial aggregation of the target (eq. 7-8) as one custom VJP.

docs/method.md, Losses: x <- (1 - alpha) x + alpha W x with W the scored
(`cos`) or plain (`kl`) softmax of the self-similarity, a chunk of rows at
a time (`plca_jax.losses.similarity`).
"""

import functools

import jax
import jax.numpy as jnp

from plca_jax.losses import similarity


# Blocks of the `cos` aggregation's triangular backward, in chunk sizes
# (_triangle_geometry).
TRIANGLE_BLOCKS = 4


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
  xf = similarity.at_least_f32(x)
  u, ra, c, v, rb = similarity.scaled_operands(xf, metric)
  n = xf.shape[0]
  chunk, num_chunks = similarity.chunk_geometry(n, chunk_size)

  def chunk_rows(start):
    u_r, ra_r, c_r, x_r = (
        similarity.take_rows(y, start, chunk) for y in (u, ra, c, xf))
    d = similarity.similarity_rows(u_r * ra_r[:, None], c_r, v, rb)
    m, sc, l = similarity.row_stats(d, metric == "cos")
    w = jnp.exp((d - m) / sc - l)
    return (1.0 - alpha) * x_r + alpha * (w @ xf), (m, sc, l), d

  if num_chunks == 1:  # the whole D, also returned
    out, stats, d = chunk_rows(0)
    return out, stats, d

  def body(carry, k):
    out, stats = carry
    start, fresh = similarity.row_block(k, chunk, n)
    rows, row_stats, _ = chunk_rows(start)
    return (similarity.put_rows(out, start, rows, fresh),
            tuple(similarity.put_rows(acc, start, y, fresh)
                  for acc, y in zip(stats, row_stats))), None

  column = jnp.zeros((n, 1), xf.dtype)
  (out, stats), _ = jax.lax.scan(
      body, (jnp.zeros_like(xf), (column,) * 3), jnp.arange(num_chunks))
  return out, stats, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _aggregate_single(x, metric, alpha, chunk_size, precision):
  with similarity.products_precision(precision):
    return _aggregate_rows(x, metric, alpha, chunk_size)[0]


def _aggregate_fwd(x, metric, alpha, chunk_size, precision):
  with similarity.products_precision(precision):
    out, stats, d = _aggregate_rows(x, metric, alpha, chunk_size)
  # x in its own dtype (bfloat16 stays bfloat16); `cos` also keeps the
  # output, from which its backward reads the rows' sum_j w_ij dw_ij, and,
  # where D is one chunk (small images), D itself: its backward then forms
  # 3 (L x L x C) products instead of 4.
  if metric != "cos":
    return out, (x, None, stats, None)
  return out, (x, out, stats, d)


def _aggregate_bwd(metric, alpha, chunk_size, precision, res, g):
  x, out, stats, d = res
  with similarity.products_precision(precision):
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
  For the aggregation's forward + backward at 92x92, C=2048, chunk 256,
  blocks of 4 chunks (TRIANGLE_BLOCKS) took 0.83x the time of the row-by-row
  backward, blocks of 2 chunks 0.87x, blocks of 8 the same as 4 with more
  temporary memory (benchmarks/association.py, one setting per run).
  """
  if chunk_size is None:
    return similarity.chunk_geometry(num_rows, None)
  _, num_blocks = similarity.chunk_geometry(num_rows,
                                            TRIANGLE_BLOCKS * chunk_size)
  block = -(-num_rows // num_blocks)
  if block > 8:
    block = -(-block // 8) * 8
  return similarity.chunk_geometry(num_rows, min(block, num_rows))


def _aggregate_bwd_cos(alpha, chunk_size, x, out, stats, g, d=None):
  """Gradient w.r.t. x (L, C) of the `cos` aggregation, cotangent g; `d`,
  the forward's whole D where it was one chunk, else None."""
  mean, scale, lse = (y[:, 0] for y in stats)
  xf = similarity.at_least_f32(x)
  gf = g.astype(xf.dtype)
  sq, r = similarity.sq_norm_and_inverse(xf)
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
    start, fresh = similarity.row_block(b, block, n)
    x_b, r_b, g_b, mean_b, scale_b, lse_b, rho_b = (similarity.take_rows(
        y, start, block) for y in (xf, r, gf, mean, scale, lse, rho))
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
    acc = similarity.add_at(similarity.add_at(acc, sk, to_k), sm, to_m)
    wdw = similarity.add_at(
        similarity.add_at(wdw, sm, jnp.sum(w_km * dw_km, 0)), sk,
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
    return (similarity.add_at(acc, sk, to_k),
            similarity.add_at(wdw, sk, jnp.sum(w * dw, 0))), None

  carry = (jnp.zeros_like(xf), jnp.zeros((n,), xf.dtype))
  carry, _ = jax.lax.scan(diagonal, carry, jnp.arange(num_blocks))
  if num_blocks > 1:
    pairs = jnp.stack(jnp.triu_indices(num_blocks, k=1), axis=-1)  # k < m
    carry, _ = jax.lax.scan(pair, carry, pairs)
  acc, wdw = carry
  # dx = (1 - a) g + W^T g + r (dx^ - (x^ . dx^) x^), the projection only
  # where |x| > 1e-12 (r is constant below).
  x_dxhat = jnp.sum(xf * acc, -1) - wdw / r
  dr = jnp.where(sq > similarity.NORM_EPS**2, r**3 * x_dxhat, 0.0)
  dx = (1.0 - alpha) * gf + r[:, None] * acc - dr[:, None] * xf
  return dx.astype(x.dtype)


def _aggregate_bwd_kl(alpha, chunk_size, x, stats, g):
  """Gradient w.r.t. x (L, C) of the `kl` aggregation, cotangent g."""
  mean, scale, lse = stats
  xf = similarity.at_least_f32(x)
  u, _, c, v, rb = similarity.scaled_operands(xf, "kl")
  n = xf.shape[0]
  chunk, num_chunks = similarity.chunk_geometry(n, chunk_size)

  def body(carry, k):
    dx, da, db, dc = carry
    start, fresh = similarity.row_block(k, chunk, n)
    u_r, c_r, mean_r, scale_r, lse_r = (
        similarity.take_rows(y, start, chunk) for y in (u, c, mean, scale, lse))
    # Rows an earlier chunk had contribute nothing.
    g_r = alpha * similarity.take_rows(g, start, chunk).astype(
        xf.dtype) * fresh[:, None]
    w = jnp.exp((similarity.similarity_rows(u_r, c_r, v, rb) - mean_r) / scale_r
                - lse_r)  # W rows, recomputed once
    dw = g_r @ xf.T  # dL/dW, (R, L)
    dd = w * (dw - jnp.sum(w * dw, axis=-1, keepdims=True)) / scale_r
    return (dx + w.T @ g_r, similarity.add_at(da, start,
                                              dd @ v), db + dd.T @ u_r,
            similarity.add_at(dc, start, jnp.sum(dd, -1))), None

  zeros = jnp.zeros_like(xf)
  (dx, da, db, dc), _ = jax.lax.scan(
      body, (zeros, zeros, zeros, jnp.zeros((n,), xf.dtype)),
      jnp.arange(num_chunks))
  dx_operands = similarity.operands_grad(xf, "kl", da, dc, db)
  return ((1.0 - alpha) * g + dx + dx_operands).astype(x.dtype)


_aggregate_single.defvjp(_aggregate_fwd, _aggregate_bwd)


def spatial_aggregate(x, metric="cos", alpha=0.5, chunk_size=None,
                      precision="highest"):
  """Blends each pixel with its similarity-weighted aggregation (eq. 7-8).

  W = contrast_normalize(D_cos(x, x)) for `cos`, softmax(D_kl(x, x)) for `kl`;
  returns (1 - alpha) x + alpha W x. Gradients flow through W and x.

  Args:
    x: (N, H, W, C) features (`cos`) or probabilities (`kl`).
    metric: "cos" or "kl".
    alpha: blend weight of the aggregation.
    chunk_size: rows of W alive at once (None: all).
    precision: of its matrix products (`similarity.PRECISIONS`).

  Returns:
    (N, H, W, C) in float32 (float64 for float64 input).
  """
  similarity.check_metric(metric)
  n, h, w, ch = x.shape
  fn = functools.partial(_aggregate_single, metric=metric, alpha=alpha,
                         chunk_size=chunk_size, precision=precision)
  return similarity.per_image(fn, x.reshape(n, h * w, ch)).reshape(n, h, w, ch)
