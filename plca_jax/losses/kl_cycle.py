"""The `kl` cycle association of one image pair (L_cass).

docs/method.md, Losses; `association` for the custom VJP around it.

`kl` (L_cass): D_ts(j, i) = -KL(q_j || p_i) is no transpose of D_st. Per
chunk of source rows i: D_st(i, :), j*, S_st(i, j*); D_ts(j*, :), i*,
S_ts(j*, i*); loss; dL/dD_st(i, :) = u (one_hot(j*) - S_st(i, :)) / sd,
likewise for D_ts(j*, :); then 4 products give the operands' gradients:
6 (L x L x M) products, cheap at M = 16 classes.
"""

import jax
import jax.numpy as jnp

from plca_jax.losses import similarity


def kl_cycle_rows(s, t, labels, ignore_label, chunk_size, sim_plca,
                  with_grads):
  """The `kl` cycle of one pair s (Ls, C), t (Lt, C), labels (Ls,):
  outputs and gradients."""
  metric = "kl"
  sf, tf = similarity.at_least_f32(s), similarity.at_least_f32(t)
  u_s, _, c_s, v_s, _ = similarity.scaled_operands(sf, metric)
  u_t, _, c_t, v_t, _ = similarity.scaled_operands(tf, metric)
  valid = labels != ignore_label
  dtype = sf.dtype

  def scores(d, idx):
    """Rows d (R, L): S[r, idx[r]], the score rows S and their scale."""
    mean, scale, lse = similarity.row_stats(d, True)
    z = (d - mean) / scale
    return jnp.exp(similarity.pick(z, idx) - lse[:, 0]), jnp.exp(z - lse), scale

  n = sf.shape[0]
  chunk, num_chunks = similarity.chunk_geometry(n, chunk_size)

  def body(carry, k):
    outs, grads = carry
    start, fresh = similarity.row_block(k, chunk, n)
    a_r, c_r, y_r, valid_r = (similarity.take_rows(y, start, chunk)
                              for y in (u_s, c_s, labels, valid))
    d_st = a_r @ v_t.T + c_r[:, None]  # D_st(i, :), (R, Lt)
    j = jnp.argmax(d_st, axis=1)  # first index on ties
    a_j = u_t[j]
    d_ts = a_j @ v_s.T + c_t[j][:, None]  # D_ts(j*, :), (R, Ls)
    i_back = jnp.argmax(d_ts, axis=1)
    selected = valid_r & (labels[i_back] == y_r)
    if sim_plca:
      loss = -(similarity.pick(d_st, j) + similarity.pick(d_ts, i_back))
    else:
      p_st, probs_st, scale_st = scores(d_st, j)
      p_ts, probs_ts, scale_ts = scores(d_ts, i_back)
      p = p_st * p_ts
      loss = similarity.bce_positive(p)
    outs = tuple(similarity.put_rows(acc, start, rows, fresh) for acc, rows in
                 zip(outs, (loss, j, i_back, selected)))
    if not with_grads:
      return (outs, grads), None
    # Rows an earlier chunk had contribute nothing.
    w = (selected & fresh).astype(dtype)
    if sim_plca:
      g_st = -w[:, None] * similarity.one_hot_minus(j, jnp.zeros_like(d_st))
      g_ts = -w[:, None] * similarity.one_hot_minus(i_back,
                                                    jnp.zeros_like(d_ts))
    else:
      u = (w * similarity.bce_grad(p) * p)[:, None]
      g_st = u * similarity.one_hot_minus(j, probs_st) / scale_st
      g_ts = u * similarity.one_hot_minus(i_back, probs_ts) / scale_ts
    da_s, db_s, dc_s, da_t, db_t, dc_t = grads
    return (outs, (similarity.add_at(da_s, start,
                                     g_st @ v_t), db_s + g_ts.T @ a_j,
                   similarity.add_at(dc_s, start,
                                     jnp.sum(g_st,
                                             -1)), da_t.at[j].add(g_ts @ v_s),
                   db_t + g_st.T @ a_r, dc_t.at[j].add(jnp.sum(g_ts,
                                                               -1)))), None

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
  ds = similarity.operands_grad(sf, metric, da_s, dc_s, db_s)
  dt = similarity.operands_grad(tf, metric, da_t, dc_t, db_t)
  return result, (ds.astype(s.dtype), dt.astype(t.dtype))
