r"""How far the association moves when its products lose precision.

On TPU a float32 matrix product at default precision rounds its operands to
bfloat16 (8-bit significand) and accumulates in float32; NVIDIA GPUs since
Ampere round them to TF32 (11-bit significand). Rounding the association's
inputs (features, probabilities) the same way before float32 products on
the CPU gives the association such a product computes, and this compares
it with float32 inputs:
- the share of source pixels whose associated target pixel j* changes,
  and of those whose cycle-back pixel i* changes;
- the relative change of the loss (L_fass on features, L_cass on
  probabilities), target aggregation included.

Inputs are one or more image pairs on the grid of a crop (41x41 for
321x321, 92x92 for 730x730) with blocky class maps; each pixel's feature is
max(0, mu_class + noise * z) over C channels (the non-negative, class-
clustered shape of ResNet layer4 outputs), its probabilities a softmax of
class logits with the same noise. `--noise` sets how far pixels of a class
spread: larger noise, more nearly tied similarities.

    python benchmarks/association_precision.py            # 41x41, C=2048
    python benchmarks/association_precision.py --size=92 --pairs=1
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax import losses
# pylint: enable=g-import-not-at-top,wrong-import-position


def round_significand(x, bits):
  """x (float32) rounded to nearest-even with `bits` significand bits
  (bfloat16: 8, TF32: 11), kept in float32."""
  x = np.asarray(x, np.float32)
  drop = 24 - bits
  u = x.view(np.uint32).astype(np.uint64)
  half = np.uint64(1 << (drop - 1))
  odd = (u >> np.uint64(drop)) & np.uint64(1)
  u = ((u + half - np.uint64(1) + odd) >> np.uint64(drop)) << np.uint64(drop)
  return u.astype(np.uint32).view(np.float32)


def make_pair(rng, size, channels, classes, noise, pairs):
  """(source features, target features, source logits, target logits,
  source labels on the grid) for `pairs` image pairs."""
  def labels():
    coarse = rng.integers(0, classes, (pairs, 6, 6))
    grid = np.repeat(np.repeat(coarse, -(-size // 6), 1), -(-size // 6), 2)
    return grid[:, :size, :size]

  means = rng.normal(size=(classes, channels)).astype(np.float32)
  logit_means = 4.0 * rng.normal(size=(classes, classes)).astype(np.float32)

  def domain(y, shift):
    z = rng.normal(size=(*y.shape, channels)).astype(np.float32)
    features = np.maximum(means[y] + shift + noise * z, 0.0)
    logits = logit_means[y] + noise * 2.0 * rng.normal(
        size=(*y.shape, classes)).astype(np.float32)
    return features, logits

  ys, yt = labels(), labels()
  fs, ls = domain(ys, 0.0)
  ft, lt = domain(yt, 0.3)  # a domain gap: shifted target features
  return fs, ft, ls, lt, ys


def associate(fs, ft, ls, lt, ys, chunk):
  out = {}
  for name, metric, s, t in (("fass", "cos", fs, ft),
                             ("cass", "kl", jax.nn.softmax(ls, -1),
                              jax.nn.softmax(lt, -1))):
    a = losses.cycle_association(jnp.asarray(s), jnp.asarray(t),
                                 jnp.asarray(ys), metric, chunk_size=chunk)
    out[name] = jax.device_get(a)
  return out


def compare(ref, other):
  rows = {}
  for name in ref:
    r, o = ref[name], other[name]
    valid = np.asarray(r["valid"])
    rows[name] = {
        "j_star changed %": 100 * float(np.mean(
            (r["j_star"] != o["j_star"])[valid])),
        "i_star changed %": 100 * float(np.mean(
            (r["i_star"] != o["i_star"])[valid])),
        "loss change %": 100 * abs(float(o["mean_loss"]) -
                                   float(r["mean_loss"])) /
                         max(abs(float(r["mean_loss"])), 1e-12)}
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=41)
  parser.add_argument("--channels", type=int, default=2048)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--pairs", type=int, default=2)
  parser.add_argument("--noise", default="0.5,1,2")
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  report.add_flag(parser)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  rows = []
  for noise in (float(n) for n in args.noise.split(",")):
    fs, ft, ls, lt, ys = make_pair(rng, args.size, args.channels,
                                   args.classes, noise, args.pairs)
    ref = associate(fs, ft, ls, lt, ys, args.chunk)
    with jax.enable_x64(True):
      exact = associate(*(np.float64(a) for a in (fs, ft, ls, lt)), ys,
                        args.chunk)
    for label, rounded in (
        ("float64", exact),
        ("tf32 inputs", associate(*(round_significand(a, 11) for a in (
            fs, ft, ls, lt)), ys, args.chunk)),
        ("bfloat16 inputs", associate(*(round_significand(a, 8) for a in (
            fs, ft, ls, lt)), ys, args.chunk))):
      for name, values in compare(ref, rounded).items():
        rows.append({"noise": noise, "term": name, "vs float32": label,
                     **{k: f"{v:.2f}" for k, v in values.items()}})
  headers = list(rows[0])
  title = (f"association at {args.size}x{args.size}, C={args.channels}, "
           f"{args.classes} classes, {args.pairs} pair(s)")
  print(title)
  print("  ".join(f"{h:>16}" for h in headers))
  for row in rows:
    print("  ".join(f"{str(row[h]):>16}" for h in headers), flush=True)
  report.emit(args, headers, [[row[h] for h in headers] for row in rows],
              title)

if __name__ == "__main__":
  main()
