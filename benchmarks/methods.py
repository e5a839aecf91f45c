r"""The method table on the demo domains: every method, several seeds.

    python benchmarks/methods.py                  # 3 seeds, 600 updates each
    python benchmarks/methods.py --seeds=0 --steps=100 --methods=plca,fda

Trains each method with `configs/demo.py` (same network, data, number of
updates and evaluation) in its own process, and prints the target mIoU
(mean +- std over seeds) and the wall time per update. Rows:

- source_only, adaptsegnet, fda (beta 0.01): evaluated without test-time
  aggregation, their authors' protocol;
- fda_mbt: FDA trained with beta 0.01, 0.05 and 0.09, MBT pseudo-labels
  from the three (`python -m plca_jax.methods.mbt`), then the self-training
  round (a new run from scratch with the pseudo-labels); its time per update
  is the round's;
- pixel_contrast: stage 1 (grayscale, CE + entropy), MBT pseudo-labels of
  that one model, then stage 2 (a new run from scratch: stylised source CE,
  entropy, pixel contrast); its time per update is stage 2's;
- ldr: `configs/ldr.py`'s networks; LDR_TRANSLATION_STEPS updates of the
  translation networks, then the given number of segmentation updates
  (poly horizon the same), evaluated through the translation network (its
  protocol); its time per update is over both phases;
- plca: with test-time aggregation (its protocol), and "plca (no TTA)", the
  same checkpoint evaluated without it;
- dacs: mean teacher + ClassMix (configs/dacs.py's settings on the demo);
  dacs_plca: the same with PLCA's objective on the source-target pair
  (`--config.dacs.plca_terms=True`); both without test-time aggregation.

Runs go to --workdir/<method>_<seed>; an existing finished run is reused
(delete it to re-run). Results are also written to --workdir/results.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
# pylint: enable=g-import-not-at-top,wrong-import-position
METHODS = ("source_only", "adaptsegnet", "fda", "fda_mbt", "pixel_contrast",
           "ldr", "plca", "dacs", "dacs_plca")
BETAS = (0.01, 0.05, 0.09)
LDR_TRANSLATION_STEPS = 200  # configs/ldr.py's demo phase 1


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished(workdir, steps):
  return any(r.get("step") == steps and "eval/miou" in r
             for r in _metrics(workdir))


def _run(args, log):
  env = {**os.environ, "PYTHONPATH": REPO}
  with open(log, "w") as f:
    subprocess.run([sys.executable, *args], check=True, env=env, stdout=f,
                   stderr=subprocess.STDOUT, cwd=REPO)


def train(workdir, method, seed, steps, *extra, config="configs/demo.py"):
  """Trains one run unless it is finished; returns its workdir."""
  if not _finished(workdir, steps):
    overrides = [f"--config.method={method}", f"--config.seed={seed}",
                 f"--config.train.num_steps={steps}",
                 f"--config.optim.schedule_steps={steps}",
                 f"--config.train.eval_every={steps}"]
    if method != "plca":
      overrides.append("--config.eval.aggregate=False")
    t0 = time.time()
    _run(["-m", "plca_jax.main", f"--config={config}",
          f"--workdir={workdir}", *overrides, *extra],
         workdir.rstrip("/") + ".log")
    print(f"  {os.path.basename(workdir)}: {time.time() - t0:.0f} s",
          flush=True)
  return workdir


def result(workdir):
  """(final target mIoU in %, median seconds per update).

  The training run's own final evaluation: the first eval record of the
  last step (eval-only runs on the workdir append theirs after it).
  """
  records = _metrics(workdir)
  last = max(r["step"] for r in records if "eval/miou" in r)
  miou = [r["eval/miou"] for r in records
          if "eval/miou" in r and r["step"] == last][0]
  rates = [r["steps_per_sec"] for r in records if "steps_per_sec" in r]
  # The first report includes compilation.
  rate = statistics.median(rates[1:] if len(rates) > 1 else rates)
  return 100 * miou, 1.0 / rate


def plca_without_tta(workdir):
  """mIoU of the final PLCA checkpoint evaluated without aggregation."""
  log = workdir.rstrip("/") + "_no_tta.log"
  _run(["-m", "plca_jax.main", "--config=configs/demo.py",
        f"--workdir={workdir}", "--mode=eval",
        "--config.eval.aggregate=False"], log)
  return 100 * [r["eval/miou"] for r in _metrics(workdir)
                if "eval/miou" in r][-1]


def run_seed(root, method, seed, steps):
  """{row name: (mIoU, s/update)} of one method and seed."""
  workdir = os.path.join(root, f"{method}_{seed}")
  if method == "fda_mbt":
    models = [train(os.path.join(root, f"fda_{seed}" if b == BETAS[0] else
                                 f"fda_beta{b}_{seed}"), "fda", seed, steps,
                    f"--config.fda.beta={b}") for b in BETAS]
    pseudo = os.path.join(root, f"mbt_labels_{seed}")
    if not os.path.isdir(pseudo):
      _run(["-m", "plca_jax.methods.mbt", "--config=configs/demo.py",
            "--config.method=fda", f"--workdirs={','.join(models)}",
            f"--out={pseudo}"], pseudo + ".log")
    train(workdir, "fda", seed, steps,
          f"--config.fda.pseudo_label_dir={pseudo}")
    return {"fda_mbt": result(workdir)}
  if method == "pixel_contrast":
    gray = "--config.data.grayscale=True"
    stage1 = train(os.path.join(root, f"pixel_contrast_stage1_{seed}"),
                   "pixel_contrast", seed, steps, gray)
    pseudo = os.path.join(root, f"pixel_contrast_labels_{seed}")
    if not os.path.isdir(pseudo):
      _run(["-m", "plca_jax.methods.mbt", "--config=configs/demo.py",
            "--config.method=pixel_contrast", gray, f"--workdirs={stage1}",
            f"--out={pseudo}"], pseudo + ".log")
    train(workdir, "pixel_contrast", seed, steps,
          f"--config.pixel_contrast.pseudo_label_dir={pseudo}")
    return {"pixel_contrast": result(workdir)}
  if method == "ldr":
    train(workdir, "ldr", seed, LDR_TRANSLATION_STEPS + steps,
          f"--config.ldr.translation_steps={LDR_TRANSLATION_STEPS}",
          config="configs/ldr.py")
    return {"ldr": result(workdir)}
  if method == "dacs_plca":
    train(workdir, "dacs", seed, steps, "--config.dacs.plca_terms=True")
    return {"dacs_plca": result(workdir)}
  if method == "fda":
    workdir = os.path.join(root, f"fda_{seed}")
    train(workdir, "fda", seed, steps, "--config.fda.beta=0.01")
    return {"fda": result(workdir)}
  train(workdir, method, seed, steps)
  rows = {method: result(workdir)}
  if method == "plca":
    rows["plca (no TTA)"] = (plca_without_tta(workdir), rows["plca"][1])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--workdir", default="/tmp/plca_methods")
  report.add_flag(parser)
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  names = args.methods.split(",")
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; expected some of {METHODS}")
  os.makedirs(args.workdir, exist_ok=True)
  table = {}
  for seed in seeds:
    for name in names:
      print(f"seed {seed}, {name}", flush=True)
      for row, value in run_seed(args.workdir, name, seed,
                                 args.steps).items():
        table.setdefault(row, []).append(value)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"seeds": seeds, "steps": args.steps, "rows": table}, f,
              indent=1)
  print(f"\ndemo domains, {args.steps} updates, seeds {seeds}")
  print(f"{'method':<16}{'target mIoU':>16}{'s / update':>12}  per seed")
  md_rows = []
  for row, values in table.items():
    mious = [v[0] for v in values]
    std = statistics.stdev(mious) if len(mious) > 1 else 0.0
    times = statistics.mean(v[1] for v in values)
    md_rows.append((row, f"{statistics.mean(mious):.2f} ± {std:.2f}",
                    " / ".join(f"{m:.2f}" for m in mious),
                    f"{times:.3f}"))
    print(f"{row:<16}{statistics.mean(mious):10.2f} +- {std:4.2f}"
          f"{times:12.3f}  " + ", ".join(f"{m:.2f}" for m in mious))
  report.emit(args, ("method", "target mIoU, mean ± std", "per seed",
                     "s / update"), md_rows,
              title=f"demo domains, {args.steps} updates, seeds {seeds}")


if __name__ == "__main__":
  main()
