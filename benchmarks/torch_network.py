r"""PyTorch reference: the same DeepLab-V2's update on this CPU.

The authors' release cannot be downloaded here, so its figures in the README
were measured elsewhere. This times the network part of its update on the
machine at hand, for calibration: the PyTorch DeepLab-V2 of the tests
(tests/torch_models.py, SPEC.md s. 1), train mode, one source and one target
forward pass (separate BatchNorm batches), pixel cross-entropy on the source
logits, backward, an SGD step; no PLCA term. torch's default thread count.

    python benchmarks/torch_network.py --depth=101 --crop=321
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

from tests import torch_models


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
  args = parser.parse_args()
  torch.manual_seed(0)
  model = torch_models.DeepLabV2(args.depth, args.classes).train()
  opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                        weight_decay=5e-4)
  shape = (args.batch, 3, args.crop, args.crop)
  source, target = torch.randn(shape), torch.randn(shape)
  labels = torch.randint(0, args.classes, (args.batch, args.crop, args.crop))

  def update():
    opt.zero_grad()
    _, logits_t = model(target)  # the release runs the target batch first
    _, logits = model(source)
    up = torch.nn.functional.interpolate(logits, size=labels.shape[1:],
                                         mode="bilinear", align_corners=False)
    loss = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
    if args.target_loss:
      loss = loss - 0.01 * torch.log_softmax(logits_t, 1).mean()
    loss.backward()
    opt.step()

  update()  # warm-up
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    update()
    times.append(time.perf_counter() - t0)
  work = "CE + target term" if args.target_loss else "CE only"
  print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"R{args.depth} DeepLab-V2, {args.crop}x{args.crop}, {args.batch} "
        f"image(s) per domain, {work}: median "
        f"{statistics.median(times):.2f} s, min {min(times):.2f} s per update")


if __name__ == "__main__":
  main()
