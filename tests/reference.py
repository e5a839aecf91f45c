"""Plain NumPy float64 reference implementations of the PLCA losses.

Written independently of plca_jax, from docs/method.md, Losses: full similarity
matrices, explicit loops, no chunking. Every stop-gradient quantity (row mean
and std of the contrast normalisation, argmax choices, the LSR factor) is
computed from the `frozen` inputs when given, so that finite differences of
`f(x, frozen=x0)` at x = x0 give exactly the gradient autodiff must produce.
"""

import numpy as np

EPS_KL = 1e-10


def softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def similarity(a, b, metric):
  """D[i, j] = D(a_i, b_j); a (La, C), b (Lb, C)."""
  if metric == "cos":
    na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return na @ nb.T
  # -KL(a_i || b_j) = sum_c a_ic (log(b_jc + eps) - log(a_ic + eps))
  diff = np.log(b[None, :, :] + EPS_KL) - np.log(a[:, None, :] + EPS_KL)
  return np.sum(a[:, None, :] * diff, axis=2)


def scoring(d, d_frozen):
  """Row softmax of (d - mean) / (std + 1e-10); stats from d_frozen."""
  mean = d_frozen.mean(axis=1, keepdims=True)
  std = d_frozen.std(axis=1, ddof=1, keepdims=True)
  return softmax((d - mean) / (std + 1e-10), axis=1)


def aggregate(x, x_frozen, metric, alpha):
  """Eq. 7-8 on one image (L, C); also returns the frozen-side result."""
  d = similarity(x, x, metric)
  d0 = similarity(x_frozen, x_frozen, metric)
  if metric == "cos":
    w, w0 = scoring(d, d0), scoring(d0, d0)
  else:
    w, w0 = softmax(d, axis=1), softmax(d0, axis=1)
  return ((1 - alpha) * x + alpha * w @ x,
          (1 - alpha) * x_frozen + alpha * w0 @ x_frozen)


def spatial_aggregate(x, metric, alpha=0.5, frozen=None):
  """x (N, H, W, C) -> (N, H, W, C)."""
  frozen = x if frozen is None else frozen
  n, h, w, c = x.shape
  out = [aggregate(x[k].reshape(-1, c), frozen[k].reshape(-1, c), metric,
                   alpha)[0] for k in range(n)]
  return np.stack(out).reshape(n, h, w, c)


def cycle(s, t, y, metric, aggregate_target=True, alpha=0.5, ignore=255,
          frozen=None, sim_plca=False):
  """Cycle association of a batch; returns (loss, details).

  s (N, Hs, Ws, C), t (N, Ht, Wt, C), y (N, Hs, Ws). details: per image
  lists of j*, i*, selected flags (numpy arrays over the source pixels).
  """
  s0, t0 = (s, t) if frozen is None else frozen
  n, c = s.shape[0], s.shape[-1]
  total, count = 0.0, 0
  details = {"j_star": [], "i_star": [], "selected": []}
  for k in range(n):
    sk, sk0 = s[k].reshape(-1, c), s0[k].reshape(-1, c)
    tk, tk0 = t[k].reshape(-1, c), t0[k].reshape(-1, c)
    yk = y[k].reshape(-1)
    if aggregate_target:
      tk, tk0 = aggregate(tk, tk0, metric, alpha)
    d_st, d_st0 = similarity(sk, tk, metric), similarity(sk0, tk0, metric)
    d_ts, d_ts0 = similarity(tk, sk, metric), similarity(tk0, sk0, metric)
    s_st, s_ts = scoring(d_st, d_st0), scoring(d_ts, d_ts0)
    js, ibs, sel = [], [], []
    for i in range(sk.shape[0]):
      j = int(np.argmax(d_st0[i]))
      ib = int(np.argmax(d_ts0[j]))
      ok = yk[i] != ignore and yk[ib] == yk[i]
      js.append(j)
      ibs.append(ib)
      sel.append(ok)
      if ok:
        if sim_plca:
          total += -(d_st[i, j] + d_ts[j, ib])
        else:
          total += -max(np.log(s_st[i, j] * s_ts[j, ib]), -100.0)
        count += 1
    details["j_star"].append(np.array(js))
    details["i_star"].append(np.array(ibs))
    details["selected"].append(np.array(sel))
  return total / max(count, 1), details


def cross_entropy(logits, labels, ignore=255):
  n, h, w, m = logits.shape
  z = logits.reshape(-1, m)
  y = labels.reshape(-1)
  total, count = 0.0, 0
  for zi, yi in zip(z, y):
    if yi == ignore:
      continue
    total += np.log(np.sum(np.exp(zi - zi.max()))) + zi.max() - zi[yi]
    count += 1
  return total / max(count, 1)


def lovasz_softmax(probs, labels, ignore=255, frozen=None):
  """Berman et al.'s algorithm: drop ignored pixels, per present class sort
  the errors (order taken from `frozen` probs), Lovasz gradient, mean."""
  m = probs.shape[-1]
  keep = labels.reshape(-1) != ignore
  p = probs.reshape(-1, m)[keep]
  p0 = (probs if frozen is None else frozen).reshape(-1, m)[keep]
  y = labels.reshape(-1)[keep]
  losses = []
  for c in range(m):
    fg = (y == c).astype(np.float64)
    if fg.sum() == 0:
      continue
    errors = np.abs(fg - p[:, c])
    order = np.argsort(-np.abs(fg - p0[:, c]), kind="stable")
    fg_sorted = fg[order]
    gts = fg_sorted.sum()
    grad = np.empty(len(fg_sorted))
    prev = 0.0
    for k in range(len(fg_sorted)):
      inter = gts - fg_sorted[:k + 1].sum()
      union = gts + (1 - fg_sorted[:k + 1]).sum()
      jac = 1.0 - inter / union
      grad[k] = jac - prev
      prev = jac
    losses.append(np.dot(errors[order], grad))
  return float(np.mean(losses)) if losses else 0.0


def lsr(logits, lam=10.0, frozen=None):
  def r_of(z):
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp.mean(-1)
  r = r_of(logits)
  r0 = r_of(logits if frozen is None else frozen)
  return float(np.mean((r0 / lam - 1.0) * r))


def numeric_grad(f, x, eps=1e-6):
  """Central finite differences of scalar f at x (float64)."""
  g = np.zeros_like(x)
  flat = g.reshape(-1)
  for idx in range(x.size):
    xp, xm = x.copy(), x.copy()
    xp.reshape(-1)[idx] += eps
    xm.reshape(-1)[idx] -= eps
    flat[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g
