r"""The paper's ablation ladder on the demo domains, over several seeds.

Runs `python -m plca_jax.main --config=configs/demo.py` once per (rung, seed)
in its own workdir, reads the final target mIoU from its metrics.jsonl, and
for the source-only rung also evaluates on held-out *source* scenes (the
domain gap). Prints a table of mean and standard deviation.

    python benchmarks/demo_ladder.py --seeds=0,1,2 --out=/tmp/plca_ladder

Rungs: source only (CE); +Lovasz; +L_fass; +L_cass; +LSR (= full PLCA).
Runs already finished in --out are reused, so an interrupted sweep resumes.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
# pylint: enable=g-import-not-at-top,wrong-import-position

RUNGS = (
    ("source only", dict(use_lovasz=False, use_fass=False, use_cass=False,
                         use_lsr=False)),
    ("+ Lovasz", dict(use_fass=False, use_cass=False, use_lsr=False)),
    ("+ L_fass", dict(use_cass=False, use_lsr=False)),
    ("+ L_cass", dict(use_lsr=False)),
    ("+ LSR (PLCA)", {}),
)


def _command(workdir, seed, switches, extra=()):
  flags = [f"--config.loss.{k}={v}" for k, v in switches.items()]
  return [sys.executable, "-m", "plca_jax.main",
          f"--config={REPO}/configs/demo.py", f"--workdir={workdir}",
          f"--config.seed={seed}", *flags, *extra]


def _final_miou(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/miou" in r]
  return evals[-1]["eval/miou"], evals[-1]["step"]


def _run(command, log):
  with open(log, "w") as f:
    subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT,
                   env={**os.environ, "PYTHONPATH": REPO})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  report.add_flag(parser)
  parser.add_argument("--out", default="/tmp/plca_ladder")
  parser.add_argument("--rungs", default=",".join(str(i) for i in
                                                  range(len(RUNGS))))
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  rungs = [RUNGS[int(i)] for i in args.rungs.split(",")]
  results, source_miou = {}, []
  for name, switches in rungs:
    for seed in seeds:
      tag = re.sub(r"\W+", "_", name).strip("_").lower()
      workdir = os.path.join(args.out, f"{tag}_seed{seed}")
      metrics = os.path.join(workdir, "metrics.jsonl")
      done = os.path.exists(metrics) and any(
          '"eval/miou"' in line for line in open(metrics))
      if not done:
        print(f"running {name}, seed {seed} -> {workdir}", flush=True)
        os.makedirs(workdir, exist_ok=True)
        _run(_command(workdir, seed, switches),
             os.path.join(workdir, "log.txt"))
      miou, step = _final_miou(workdir)
      results.setdefault(name, []).append(miou)
      print(f"{name}, seed {seed}: target mIoU {100 * miou:.2f} "
            f"(step {step})", flush=True)
      if name == "source only":
        # The same weights on held-out source scenes (the domain gap), in a
        # workdir of its own that loads them through init_from.
        eval_dir = workdir + "_on_source"
        if not os.path.exists(os.path.join(eval_dir, "metrics.jsonl")):
          os.makedirs(eval_dir, exist_ok=True)
          _run(_command(eval_dir, seed, switches, (
              "--mode=eval", "--config.data.eval.domain=source",
              f"--config.init_from={workdir}")),
               os.path.join(eval_dir, "log.txt"))
        source_miou.append(_final_miou(eval_dir)[0])
  print()
  print(f"{'rung':<16}{'target mIoU (mean ± std over seeds)':>38}  runs")
  for name, values in results.items():
    v = 100 * np.asarray(values)
    print(f"{name:<16}{v.mean():>30.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"
          f"  {', '.join(f'{x:.2f}' for x in v)}")
  def spread(values):
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"
  report.emit(args, ("rung", "target mIoU, mean ± std", "per seed"),
              [(name, spread(v), " / ".join(f"{100 * x:.2f}" for x in v))
               for name, v in results.items()])
  if source_miou:
    v = 100 * np.asarray(source_miou)
    print(f"source only, evaluated on source val: {v.mean():.2f} ± "
          f"{v.std(ddof=1) if len(v) > 1 else 0:.2f} "
          f"({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
  main()
