r"""PyTorch reference: the same DeepLab-V2's update on this CPU.

The authors' release cannot be downloaded here, so its figures in the README
were measured elsewhere. This times the network part of its update on the
machine at hand, for calibration: the PyTorch DeepLab-V2 of the tests
(tests/torch_models.py; docs/method.md, Network), train mode, one target
and one source forward pass (separate BatchNorm batches), pixel
cross-entropy on the source logits, backward, an SGD step. `--terms` adds
terms as `benchmarks/step.py --terms` does: `lovasz` (+ Lovasz-softmax,
weight 3), `lsr` (+ LSR on both domains, back-propagating through the
target pass too), `all` (every PLCA term computed the release's way,
benchmarks/torch_plca.py: dense similarity matrices, autograd; `--plca` is
the same). torch's default thread count.

`--serve` is how `benchmarks/step.py --torch` runs it: in a process of its
own (so that neither library's heap or thread pools disturb the other's
timings), one update per line read from stdin, its seconds and loss written
to stdout.

    python benchmarks/torch_network.py --depth=101 --crop=321
    python benchmarks/torch_network.py --terms=all   # the full PLCA update
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch

from benchmarks import torch_plca
from tests import torch_models

TERMS = ("ce", "lovasz", "lsr", "all")
LOVASZ_WEIGHT = 3.0  # configs/synthia.py, as torch_plca.plca_loss


def make_update(depth, crop, batch, classes, terms="ce", target_loss=False):
  """A closure running one PyTorch update (target pass, source pass, loss,
  backward, SGD step) on fixed random inputs; `terms` one of TERMS."""
  if terms not in TERMS:
    raise ValueError(f"terms={terms!r}; expected one of {TERMS}")
  torch.manual_seed(0)
  model = torch_models.DeepLabV2(depth, classes).train()
  opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                        weight_decay=5e-4)
  shape = (batch, 3, crop, crop)
  source, target = torch.randn(shape), torch.randn(shape)
  # Blocky labels, like real label maps (and like benchmarks/step.py).
  coarse = torch.randint(0, classes, (batch, 8, 8))
  cell = -(-crop // 8)
  labels = coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[
      :, :crop, :crop].contiguous()

  def update():
    opt.zero_grad()
    out_t = model(target)  # the release runs the target batch first
    out_s = model(source)
    if terms == "all":
      loss = torch_plca.plca_loss(out_s, out_t, labels, LOVASZ_WEIGHT)
    else:
      up = torch.nn.functional.interpolate(
          out_s[1], size=labels.shape[1:], mode="bilinear",
          align_corners=False)
      loss = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
      if terms in ("lovasz", "lsr"):
        probs = torch.softmax(up, 1).permute(0, 2, 3, 1).reshape(-1, classes)
        loss = loss + LOVASZ_WEIGHT * torch_plca.lovasz_softmax(
            probs, labels.reshape(-1))
      if terms == "lsr":
        loss = loss + 0.01 * (torch_plca.lsr(out_s[1]) +
                              torch_plca.lsr(out_t[1]))
      if target_loss:
        loss = loss - 0.01 * torch.log_softmax(out_t[1], 1).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())

  return update


def serve(update):
  """One update per stdin line; writes "<seconds> <loss>" per update."""
  update()  # warm-up
  print("ready", flush=True)
  for _ in sys.stdin:
    t0 = time.perf_counter()
    loss = update()
    print(f"{time.perf_counter() - t0:.6f} {loss:.6f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depth", type=int, default=101)
  parser.add_argument("--crop", type=int, default=321)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--steps", type=int, default=4)
  report.add_flag(parser)
  parser.add_argument("--terms", default="ce", choices=TERMS)
  parser.add_argument("--target_loss", action="store_true",
                      help="also back-propagate through the target pass "
                      "(as PLCA's LSR and association terms make the "
                      "release do): 0.01 x mean log-softmax of its logits")
  parser.add_argument("--plca", action="store_true",
                      help="the full PLCA objective, release-style "
                      "(benchmarks/torch_plca.py): --terms=all")
  parser.add_argument("--host_memory", default="keep",
                      choices=("keep", "default"),
                      help="keep: glibc keeps freed memory for reuse, as "
                      "plca_jax.main and benchmarks/step.py set it")
  parser.add_argument("--serve", action="store_true",
                      help="time updates on request (benchmarks/step.py "
                      "--torch)")
  args = parser.parse_args()
  if args.host_memory == "keep":
    from plca_jax import xla  # pylint: disable=g-import-not-at-top
    xla.keep_freed_host_memory()
  terms = "all" if args.plca else args.terms
  update = make_update(args.depth, args.crop, args.batch, args.classes,
                       terms, args.target_loss)
  if args.serve:
    serve(update)
    return
  update()  # warm-up
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    update()
    times.append(time.perf_counter() - t0)
  work = {"ce": "CE only", "lovasz": "CE + Lovasz", "lsr": "CE + Lovasz + LSR",
          "all": "all PLCA terms, release-style"}[terms]
  if args.target_loss:
    work += " + target term"
  print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"R{args.depth} DeepLab-V2, {args.crop}x{args.crop}, {args.batch} "
        f"image(s) per domain, {work}: median "
        f"{statistics.median(times):.2f} s, min {min(times):.2f} s per update")
  report.emit(args, ("update", "median s", "min s"),
              [(work, f"{statistics.median(times):.2f}",
                f"{min(times):.2f}")])


if __name__ == "__main__":
  main()
