r"""PyTorch reference: the same DeepLab-V2's update on this CPU.

The authors' release cannot be downloaded here, so its figures in the README
were measured elsewhere. This times the network part of its update on the
machine at hand, for calibration: the PyTorch DeepLab-V2 of the tests
(tests/torch_models.py, SPEC.md s. 1), train mode, one target and one source
forward pass (separate BatchNorm batches), pixel cross-entropy on the source
logits, backward, an SGD step. `--plca` adds every PLCA term computed the
release's way (benchmarks/torch_plca.py: dense similarity matrices,
autograd): the same update as `benchmarks/step.py --terms=all`.
torch's default thread count.

    python benchmarks/torch_network.py --depth=101 --crop=321
    python benchmarks/torch_network.py --plca      # the full PLCA update
"""

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import torch

from benchmarks import torch_plca
from tests import torch_models


def make_update(depth, crop, batch, classes, plca=False, target_loss=False):
  """A closure running one PyTorch update (target pass, source pass, loss,
  backward, SGD step) on fixed random inputs."""
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
    if plca:
      loss = torch_plca.plca_loss(out_s, out_t, labels)
    else:
      up = torch.nn.functional.interpolate(
          out_s[1], size=labels.shape[1:], mode="bilinear",
          align_corners=False)
      loss = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
      if target_loss:
        loss = loss - 0.01 * torch.log_softmax(out_t[1], 1).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())

  return update


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depth", type=int, default=101)
  parser.add_argument("--crop", type=int, default=321)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--classes", type=int, default=16)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--target_loss", action="store_true",
                      help="also back-propagate through the target pass "
                      "(as PLCA's LSR and association terms make the "
                      "release do): 0.01 x mean log-softmax of its logits")
  parser.add_argument("--plca", action="store_true",
                      help="the full PLCA objective, release-style "
                      "(benchmarks/torch_plca.py)")
  args = parser.parse_args()
  update = make_update(args.depth, args.crop, args.batch, args.classes,
                       args.plca, args.target_loss)
  update()  # warm-up
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    update()
    times.append(time.perf_counter() - t0)
  work = ("all PLCA terms, release-style" if args.plca else
          "CE + target term" if args.target_loss else "CE only")
  print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"R{args.depth} DeepLab-V2, {args.crop}x{args.crop}, {args.batch} "
        f"image(s) per domain, {work}: median "
        f"{statistics.median(times):.2f} s, min {min(times):.2f} s per update")


if __name__ == "__main__":
  main()
