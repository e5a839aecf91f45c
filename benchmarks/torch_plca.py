"""The PLCA terms in PyTorch, computed the way the authors' release does.

A same-machine, same-hour reference for `benchmarks/step.py` and
`benchmarks/association.py`: the release itself cannot be downloaded here,
so this re-states its loss computation in PyTorch from docs/method.md, Losses
and the structure of its solver: dense (N, L, L) similarity matrices,
autograd through everything, the D_ts rows of the cosine as the transpose
of D_st, `torch.max` over every D_ts row and a gather at j*, BCE on the
selected products, Lovasz-softmax over the whole batch (Berman et al.'s
algorithm), LSR with its factor detached. Numbers from here are labelled
"PyTorch, release-style" in the README, never "the release".
"""

import torch
import torch.nn.functional as F

KL_EPS = 1e-10
STD_EPS = 1e-10


def similarity(x1, x2, metric):
  """(N, L1, C), (N, L2, C) -> (N, L1, L2)."""
  if metric == "cos":
    return F.normalize(x1, dim=2) @ F.normalize(x2, dim=2).transpose(1, 2)
  neg_entropy = torch.sum(x1 * torch.log(x1 + KL_EPS), dim=2, keepdim=True)
  return -(neg_entropy - x1 @ torch.log(x2 + KL_EPS).transpose(1, 2))


def scoring(d):
  """Row softmax of the contrast-normalised rows (detached mean, std)."""
  mean = d.mean(dim=2, keepdim=True).detach()
  std = d.std(dim=2, keepdim=True).detach()
  return torch.softmax((d - mean) / (std + STD_EPS), dim=2)


def aggregate(x, metric, alpha=0.5):
  """(1 - alpha) x + alpha W x, W from the self-similarity of x (N, L, C)."""
  d = similarity(x, x, metric)
  w = scoring(d) if metric == "cos" else torch.softmax(d, dim=2)
  return (1.0 - alpha) * x + alpha * (w @ x)


def association(source, target, labels, metric, alpha=0.5, ignore=255):
  """L_fass (`cos`) or L_cass (`kl`): (N, L, C) inputs, labels (N, L)."""
  target = aggregate(target, metric, alpha)
  d_st = similarity(source, target, metric)
  d_ts = (d_st.transpose(1, 2) if metric == "cos"
          else similarity(target, source, metric))
  s_st, s_ts = scoring(d_st), scoring(d_ts)
  p_st, j_star = torch.max(s_st, dim=2)
  p_ts_all, i_of_j = torch.max(s_ts, dim=2)
  p_ts = torch.gather(p_ts_all, 1, j_star)
  i_star = torch.gather(i_of_j, 1, j_star)
  selected = (labels != ignore) & (torch.gather(labels, 1, i_star) == labels)
  if not bool(selected.any()):
    return source.sum() * 0.0
  p = torch.masked_select(p_st * p_ts, selected)
  return F.binary_cross_entropy(p, torch.ones_like(p))


def lovasz_softmax(probs, labels, ignore=255):
  """Mean over present classes of the Lovasz extension of the Jaccard loss.

  probs (P, M) and labels (P,) over every pixel of the batch.
  """
  keep = labels != ignore
  probs, labels = probs[keep], labels[keep]
  losses = []
  for c in range(probs.shape[1]):
    fg = (labels == c).to(probs.dtype)
    if fg.sum() == 0:
      continue
    errors = (fg - probs[:, c]).abs()
    errors_sorted, order = torch.sort(errors, descending=True)
    fg_sorted = fg[order]
    gts = fg_sorted.sum()
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1.0 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    losses.append(torch.dot(errors_sorted, jaccard))
  return torch.stack(losses).mean()


def lsr(logits, lam=10.0):
  """mean((r / lam - 1) r), r = -mean_c log p, the factor detached."""
  r = -torch.log_softmax(logits, dim=1).mean(dim=1)
  return torch.mean((r / lam - 1.0).detach() * r)


def pixel_set(x):
  """(N, C, H, W) -> (N, H*W, C)."""
  return x.flatten(2).transpose(1, 2)


def plca_loss(out_s, out_t, labels, beta1=3.0):
  """The full objective of one micro-batch (docs/method.md, Losses).

  out_s, out_t: (features, logits) NCHW at stride 8; labels (N, H, W) at
  the input size.
  """
  feats_s, logits_s = out_s
  feats_t, logits_t = out_t
  up = F.interpolate(logits_s, size=labels.shape[1:], mode="bilinear",
                     align_corners=False)
  ce = F.cross_entropy(up, labels, ignore_index=255)
  m = up.shape[1]
  lov = lovasz_softmax(torch.softmax(up, 1).permute(0, 2, 3, 1).reshape(-1, m),
                       labels.reshape(-1))
  small = F.interpolate(labels[:, None].float(), size=feats_s.shape[2:],
                        mode="nearest")[:, 0].long().flatten(1)
  fass = association(pixel_set(feats_s), pixel_set(feats_t), small, "cos")
  cass = association(pixel_set(torch.softmax(logits_s, 1)),
                     pixel_set(torch.softmax(logits_t, 1)), small, "kl")
  return (ce + beta1 * lov + 0.1 * (fass + cass) +
          0.01 * (lsr(logits_s) + lsr(logits_t)))
