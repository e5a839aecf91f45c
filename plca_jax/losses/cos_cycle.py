"""The `cos` cycle association of one image pair (L_fass).

docs/method.md, Losses; `association` for the custom VJP around it.

`cos` (L_fass): D_ts = D_st^T, so the rows of D_ts are the columns of
D_st and every row of D_ts is met once, as a column, while sweeping the
rows of D_st; nothing is computed per (i, j*(i)) pair. The column mean and
unbiased std of D_st (the detached statistics of the D_ts rows) have
closed forms, mean_j = t^_j . mean_i(s^_i) and var_j = t^_j^T Cov(s^) t^_j
(Cov from the centred source, accumulated over row chunks: no
cancellation between a second moment and a squared mean), 2 L C^2
multiply-adds, a quarter of one (L x L x C) product each at 92x92,
C = 2048. Knowing them before the sweep, one sweep over the rows of D_st
gives the rows' statistics, j*, and, per column, the running max (i*, the
first index on ties) and the running log-sum-exp of the column scores.
The loss follows; a second sweep recomputes D_st rows and forms
  dL/dD(i, j) = u_i / sd_i (one_hot_j*(i) - S_st(i, j))
              + U_j / sd'_j (one_hot_i*(j) - S_ts(j, i)),
U_j = sum of u_i over the i with j*(i) = j, u = dL/dp * p (p = S_st S_ts,
torch's BCE gradient), and the operands' gradients with 2 products:
4.5 (L x L x C) products in all, where the D_ts rows at j* took 6.
"""

import jax
import jax.numpy as jnp

from plca_jax.losses import similarity


def column_stats(s, rs, t, rt, chunk_size):
  """Detached column mean and scale (std + 1e-10) of D_st = s^ t^^T.

  s (Ls, C) and t (Lt, C) with their inverse norms rs, rt: (Lt,) each.
  """
  ns, nt = s.shape[0], t.shape[0]
  mu = jnp.mean(s * rs[:, None], axis=0)  # (C,)
  chunk, num_chunks = similarity.chunk_geometry(ns, chunk_size)

  def gram(acc, k):
    start, fresh = similarity.row_block(k, chunk, ns)
    a_r = similarity.take_rows(s, start, chunk) * similarity.take_rows(
        rs, start, chunk)[:, None] - mu
    a_r = a_r * fresh[:, None]
    return acc + a_r.T @ a_r, None

  cov, _ = jax.lax.scan(gram, jnp.zeros((s.shape[1],) * 2, s.dtype),
                        jnp.arange(num_chunks))
  cov = cov / (ns - 1)
  chunk_t, num_chunks_t = similarity.chunk_geometry(nt, chunk_size)

  def quad(acc, k):
    start, fresh = similarity.row_block(k, chunk_t, nt)
    t_r = similarity.take_rows(t, start, chunk_t)
    return similarity.put_rows(acc, start, jnp.sum((t_r @ cov) * t_r, -1),
                               fresh), None

  q, _ = jax.lax.scan(quad, jnp.zeros((nt,), s.dtype),
                      jnp.arange(num_chunks_t))
  var = jnp.maximum(q, 0.0) * rt * rt
  return rt * (t @ mu), jnp.sqrt(var) + similarity.STD_EPS


def cos_cycle_rows(s, t, labels, ignore_label, chunk_size, sim_plca,
                    with_grads):
  """The `cos` cycle of one pair s (Ls, C), t (Lt, C), labels (Ls,)."""
  sf, tf = similarity.at_least_f32(s), similarity.at_least_f32(t)
  dtype = sf.dtype
  _, rs = similarity.sq_norm_and_inverse(sf)
  _, rt = similarity.sq_norm_and_inverse(tf)
  valid = labels != ignore_label
  ns, nt = sf.shape[0], tf.shape[0]
  chunk, num_chunks = similarity.chunk_geometry(ns, chunk_size)

  def d_rows(start):
    a_r = similarity.take_rows(sf, start, chunk) * similarity.take_rows(
        rs, start, chunk)[:, None]
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
    col_mean, col_scale = (y[0] for y in similarity.mean_scale(dense[1], 0))
  else:
    col_mean, col_scale = column_stats(sf, rs, tf, rt, chunk_size)

  def sweep(carry, k):
    rows, cmax, carg, csum = carry
    start, fresh = similarity.row_block(k, chunk, ns)
    _, d = d_rows(start)
    j = jnp.argmax(d, axis=1)  # first index on ties
    if sim_plca:
      row_out = (j, similarity.pick(d, j), jnp.zeros_like(d[:, 0]),
                 jnp.ones_like(d[:, 0]), jnp.zeros_like(d[:, 0]))
    else:
      mean, scale, lse = similarity.row_stats(d, True)
      row_out = (j, similarity.pick(
          (d - mean) / scale, j) - lse[:, 0], mean[:, 0], scale[:, 0], lse[:,
                                                                           0])
    rows = tuple(similarity.put_rows(acc, start, v, fresh)
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
    loss = similarity.bce_positive(p)
  loss_sum = jnp.sum(jnp.where(selected, loss, 0.0))
  result = (loss_sum, loss, j_star, i_star, valid, selected)
  if not with_grads:
    return result, None

  w = selected.astype(dtype)
  u = -w if sim_plca else w * similarity.bce_grad(
      p) * p  # dL/dlog p, per source row
  big_u = jnp.zeros((nt,), dtype).at[j_star].add(u)  # per column j

  def grads(carry, k):
    ds_hat, dt_hat = carry
    start, fresh = similarity.row_block(k, chunk, ns)
    a_r, d = d_rows(start)
    j_r, u_r, mean_r, scale_r, lse_r = (similarity.take_rows(y, start, chunk)
                                        for y in (j_star, u, mean, scale, lse))
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
    ds_hat = similarity.add_at(ds_hat, start, (g * rt[None, :]) @ tf)
    return (ds_hat, dt_hat + g.T @ a_r), None

  (ds_hat, dt_hat), _ = jax.lax.scan(
      grads, (jnp.zeros_like(sf), jnp.zeros_like(tf)), jnp.arange(num_chunks))
  ds = similarity.operands_grad(sf, "cos", None, None, ds_hat)
  dt = similarity.operands_grad(tf, "cos", None, None, dt_hat)
  return result, (ds.astype(s.dtype), dt.astype(t.dtype))
