r"""Random vs class-overlap pairing on the demo, over several seeds.

Runs `python -m plca_jax.main --config=configs/demo.py` per (pairing, seed)
in its own workdir under --out (finished runs are reused), then prints
  1. the final target mIoU, mean and standard deviation over seeds;
  2. the association statistics over training (train/fass_* and
     train/cass_*: consistent, reached, correct) and the classes each pair
     shares, averaged over seeds at a few logged steps.

    python benchmarks/pairing.py --seeds=0,1,2 --out=/tmp/plca_pairing

The demo loads target labels (configs/demo.py) for the "*_correct"
statistics only. Class-overlap pairing here uses the model's own target
predictions ("pseudo"), as on real data; add
--target_classes=labels to pair by the target labels instead (analysis).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
# pylint: enable=g-import-not-at-top,wrong-import-position
STATS = ("fass_consistent", "fass_reached", "fass_correct", "cass_consistent",
         "cass_reached", "cass_correct", "pairing_shared_classes")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _done(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and any('"eval/miou"' in line
                                      for line in open(path))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  report.add_flag(parser)
  parser.add_argument("--out", default="/tmp/plca_pairing")
  parser.add_argument("--pairings", default="random,class_overlap")
  parser.add_argument("--target_classes", default="pseudo")
  parser.add_argument("--steps", default="50,200,400,600",
                      help="logged steps to show the statistics at")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  table = {}
  for pairing in args.pairings.split(","):
    for seed in seeds:
      workdir = os.path.join(args.out, f"{pairing}_seed{seed}")
      if not _done(workdir):
        print(f"running {pairing}, seed {seed} -> {workdir}", flush=True)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "log.txt"), "w") as log:
          subprocess.run(
              [sys.executable, "-m", "plca_jax.main",
               f"--config={REPO}/configs/demo.py", f"--workdir={workdir}",
               f"--config.seed={seed}", f"--config.data.pairing={pairing}",
               "--config.data.pairing_target_classes="
               f"{args.target_classes}"],
              check=True, stdout=log, stderr=subprocess.STDOUT,
              env={**os.environ, "PYTHONPATH": REPO})
      records = _records(workdir)
      miou = [r for r in records if "eval/miou" in r][-1]["eval/miou"]
      by_step = {r["step"]: r for r in records if "train/loss" in r}
      table.setdefault(pairing, []).append((miou, by_step))
      print(f"{pairing}, seed {seed}: target mIoU {100 * miou:.2f}",
            flush=True)

  def spread(values):
    v = np.asarray(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"

  # Its tables are Markdown already; --markdown adds their provenance.
  if args.markdown:
    print("\n" + report.provenance())
  print(f"\n| pairing | target mIoU, mean ± std | seeds "
        f"{' / '.join(map(str, seeds))} |\n| --- | --- | --- |")
  for pairing, runs in table.items():
    v = [100 * m for m, _ in runs]
    print(f"| {pairing} | {spread(v)} | "
          f"{' / '.join(f'{x:.2f}' for x in v)} |")
  steps = [int(s) for s in args.steps.split(",")]
  print("\nassociation statistics over training (% , mean over seeds; "
        "shared = classes a pair shares, by the pairing's class sets)")
  print("| pairing | step | " + " | ".join(STATS) + " |")
  print("| --- | ---: |" + " ---: |" * len(STATS))
  for pairing, runs in table.items():
    for step in steps:
      cells = []
      for key in STATS:
        values = [r[step].get(f"train/{key}") for _, r in runs
                  if step in r and f"train/{key}" in r[step]]
        scale = 1 if key == "pairing_shared_classes" else 100
        cells.append(f"{scale * np.mean(values):.1f}" if values else "—")
      print(f"| {pairing} | {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
