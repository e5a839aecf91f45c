"""The paper configs on every AOT target, as one table.

    python benchmarks/aot_table.py --workdir=/tmp/aot_table \\
        --configs=synthia,gta5 --targets=all [--search_batch] --markdown

Runs `python -m plca_jax.aot` once per (config, target) in a process of its
own and keeps each report as WORKDIR/CONFIG/aot_TARGET.json, stamped with
the commit and machine it was compiled on. A report already there is
reused, so an interrupted table resumes where it stopped (a TPU compile of
the paper setting takes minutes to tens of minutes on a small host); pass
`--redo` to compile again. Prints one row per report: fits or not, peak
per device, the largest micro-batch per device (with `--search_batch`:
one to five more compiles per row, each kept; with the peak of one image
more where it was compiled), the roofline per update and the images per
domain per second per device it allows, and the compile time. "Fits" is
against the memory a program may use (`plca_jax.aot_targets`).
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import report
from plca_jax import aot_targets

GiB = aot_targets.GiB


def _aot(config, target, out_dir, timeout, *overrides):
  """Runs `python -m plca_jax.aot` for the update alone into
  OUT_DIR/aot_TARGET.json, stamped with the commit and machine.

  Returns:
    (the report, or None when it failed; the process's stderr).
  """
  path = os.path.join(out_dir, f"aot_{target}.json")
  command = [sys.executable, "-m", "plca_jax.aot",
             f"--config=configs/{config}.py", f"--target={target}",
             f"--workdir={out_dir}", "--noeval", "--nosearch_batch",
             *overrides]
  print(f"[aot_table] {config} on {target}: {' '.join(command[1:])}",
        flush=True)
  try:
    proc = subprocess.run(command, cwd=report.REPO, capture_output=True,
                          text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    print(f"[aot_table] {config} on {target}: over {timeout} s, skipped",
          flush=True)
    return None, ""
  if proc.returncode != 0 or not os.path.exists(path):
    return None, proc.stderr
  with open(path) as f:
    record = json.load(f)
  record["provenance"] = {"commit": report.commit(),
                          "machine": report.machine()}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  print(proc.stdout.strip(), flush=True)
  return record, proc.stderr


def _failed(config, target, stderr):
  from plca_jax import aot  # pylint: disable=g-import-not-at-top
  print(f"[aot_table] {config} on {target}: failed\n"
        f"{aot.error_summary(stderr)}", flush=True)


def run_one(config, target, workdir, timeout):
  """Compiles `config` for `target` into WORKDIR/CONFIG/aot_TARGET.json;
  returns the report's path, or None when the compile failed."""
  out_dir = os.path.join(workdir, config)
  record, stderr = _aot(config, target, out_dir, timeout)
  if record is None:
    _failed(config, target, stderr)
    return None
  return os.path.join(out_dir, f"aot_{target}.json")


def search(config, target, workdir, path, timeout, redo=False):
  """Adds the largest micro-batch per device to the report at `path`
  (`plca_jax.aot.search_micro_batch`, one process per compile). Each
  compile is kept as WORKDIR/CONFIG/search_N/aot_TARGET.json (N images
  per device), so an interrupted search resumes; the update compiled as
  configured counts when it is one micro-batch. A compile the TPU compiler
  refuses for memory counts as not fitting, with the bytes it names (kept
  as WORKDIR/CONFIG/search_N/refused_TARGET.json). `redo`: compile again
  what is kept."""
  from plca_jax import aot  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    record = json.load(f)
  chips = record["chips"]
  peaks = aot.known_peaks(record["config"]["train"], chips,
                          record["programs"]["train"]["memory"]["peak"])

  def peak(n):
    if n in peaks:
      return peaks[n]
    out_dir = os.path.join(workdir, config, f"search_{n}")
    kept = os.path.join(out_dir, f"aot_{target}.json")
    refused = os.path.join(out_dir, f"refused_{target}.json")
    if os.path.exists(kept) and not redo:
      with open(kept) as f:
        peaks[n] = json.load(f)["programs"]["train"]["memory"]["peak"]
      return peaks[n]
    if os.path.exists(refused) and not redo:
      with open(refused) as f:
        peaks[n] = json.load(f)["needs"]
      return peaks[n]
    found, stderr = _aot(config, target, out_dir, timeout,
                         "--config.train.auto_split=False",
                         f"--config.train.batch_size={n * chips}",
                         "--config.train.grad_accum_steps=1")
    if found is not None:
      peaks[n] = found["programs"]["train"]["memory"]["peak"]
    else:
      peaks[n] = aot.refused_peak(
          stderr, f"{config} on {target} at {n} image(s) per device")
      print(f"[aot_table] {n} per device: the compiler refused "
            f"{peaks[n] / GiB:.2f} GiB", flush=True)
      os.makedirs(out_dir, exist_ok=True)
      with open(refused, "w") as f:
        json.dump({"needs": peaks[n], "commit": report.commit(),
                   "machine": report.machine()}, f)
    return peaks[n]

  limit = aot_targets.TARGETS[target].spec.memory
  try:
    n = aot.search_micro_batch(peak, limit)
  except RuntimeError as error:
    print(f"[aot_table] {error}; no micro-batch search", flush=True)
    return
  record["largest_micro_batch"] = {"images_per_device": n,
                                   "compiles": sorted(peaks.items())}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)


def row(config, record):
  """A Markdown table row of one report."""
  train = record["programs"]["train"]
  cfg = record["config"]["train"]
  chips = record["chips"]
  memory = aot_targets.TARGETS[record["target"]].spec.memory
  k, b = cfg["grad_accum_steps"], cfg["batch_size"]
  loop = cfg.get("micro_batch_loop", "")
  update = f"{k} x {b} ({b // chips} per device{', scanned' if k > 1 and loop != 'loop' else ''})"
  peak = train["memory"]["peak"]
  margin = (memory - peak) / GiB
  fits = (f"yes, {margin:.2f} GiB to spare" if margin >= 0 else
          f"no, {-margin:.2f} GiB over")
  search = record.get("largest_micro_batch")
  largest = "not searched"
  if search:
    n = search["images_per_device"]
    over = dict(search["compiles"]).get(n + 1)
    largest = str(n) + (f" ({n + 1}: {over / GiB:.2f})" if over else
                        f" ({n + 1}: over by the fit)")
  roof = train["roofline"]
  images = k * b
  rate = aot_targets.images_per_second(images, chips, roof["estimate_s"])
  where = record.get("provenance", {})
  return (f"| {config}.py | {record['target']} | {update} | "
          f"{peak / GiB:.2f} of {memory / GiB:.2f} | {fits} | {largest} | "
          f"{train['flops'] / 1e12:.2f} | {train['bytes_accessed'] / GiB:.1f} "
          f"| {roof['estimate_s'] * 1e3:.1f} ms ({roof['bound']}) | "
          f"{rate:.2f} | {train['compile_s']:.0f} s | "
          f"{where.get('commit', '?')} |")


HEADER = ("| config | target | update (micro-batches x images per domain) "
          "| peak GiB per device | fits | largest micro-batch per device | "
          "TFLOP per device | GiB accessed per device | roofline per update "
          "| images per domain per s per device | compile | commit |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
          "| --- |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--configs", default="synthia,gta5")
  parser.add_argument("--targets", default="all",
                      help="comma-separated names, or all (every target "
                      "but tpu-v5e-4, the test slice)")
  parser.add_argument("--search_batch", action="store_true",
                      help="also find the largest micro-batch per device")
  parser.add_argument("--redo", action="store_true")
  parser.add_argument("--timeout", type=int, default=3600,
                      help="seconds per (config, target)")
  report.add_flag(parser)
  args = parser.parse_args()
  targets = ([t for t in aot_targets.TARGETS if t != "tpu-v5e-4"]
             if args.targets == "all" else args.targets.split(","))
  for name in targets:
    if name not in aot_targets.TARGETS:
      parser.error(f"--targets: {name!r} is not one of "
                   f"{', '.join(aot_targets.TARGETS)}")
  rows = []
  for config in args.configs.split(","):
    if not os.path.exists(os.path.join(report.REPO, "configs",
                                       f"{config}.py")):
      parser.error(f"--configs: configs/{config}.py does not exist")
    for target in targets:
      path = os.path.join(args.workdir, config, f"aot_{target}.json")
      if args.redo or not os.path.exists(path):
        path = run_one(config, target, args.workdir, args.timeout)
      if path and args.search_batch:
        with open(path) as f:
          searched = json.load(f).get("largest_micro_batch")
        if args.redo or not searched:
          search(config, target, args.workdir, path, args.timeout,
                 args.redo)
      if path:
        with open(path) as f:
          rows.append(row(config, json.load(f)))
  table = "\n".join([HEADER, *rows])
  print(table)
  if args.markdown:
    print()
    print(report.provenance())
    print()
    print(table)


if __name__ == "__main__":
  main()
