"""Compiles and sizes the update for a TPU slice or GPUs, on any host.

    python -m plca_jax.aot --config=configs/synthia.py --target=tpu-v5e-8
    python -m plca_jax.aot --config=configs/gta5.py --target=gpu-h100-80gb \
        --workdir=/tmp/aot     # also writes /tmp/aot/aot_gpu-h100-80gb.json

The program compiled is the one `plca_jax.main` runs on that target: the
config resolved for its device count (`schedule.resolve`), the method's
`create_train_step` with its mesh and shardings, traced for the target's
platform, and the evaluation step. No accelerator is needed: the devices
come from `jax.experimental.topologies` (libtpu for TPU, the CUDA plugin
for GPU), installed apart from the run's own environment so that plain CPU
runs never load them (`AOT_WHEELS`, docs/cloud.md).

The report, per device: argument, output, temporary and peak bytes
against the chip's memory; the largest micro-batch per device that fits
(compiles at 1 and 2 images, a linear fit, a compile confirming it); collectives by kind
with their bytes; host callbacks and transfers; custom calls; while
loops; FLOPs and bytes accessed; a roofline estimate of the update from
the chip's published peaks (`plca_jax.aot_targets`); compile times.
"""

import os
import sys

AOT_WHEELS = os.environ.get("PLCA_JAX_AOT_WHEELS", os.path.join(
    os.path.expanduser("~"), ".cache", "plca_jax", "aot-wheels"))
if __name__ == "__main__":
  # Before jax is imported (the command line only; an importer keeps its
  # process as it is): devices come from topologies, not from a backend on
  # this host, and the AOT wheels live outside the environment.
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if os.path.isdir(AOT_WHEELS) and AOT_WHEELS not in sys.path:
    sys.path.insert(0, AOT_WHEELS)

# pylint: disable=g-import-not-at-top,wrong-import-position
import collections
import copy
import dataclasses
import importlib.util
import json
import math
import re
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from plca_jax import aot_targets
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import schedule
from plca_jax import sharding
from plca_jax import train
from plca_jax import xla
from plca_jax.methods import base
# pylint: enable=g-import-not-at-top,wrong-import-position

INSTALL = (f"python -m pip install --no-deps --target {AOT_WHEELS} "
           "-r requirements-aot.txt")
_NEEDS = {"tpu": ("libtpu", "libtpu"),
          "gpu": ("jax_cuda12_plugin", "jax-cuda12-plugin and "
                  "jax-cuda12-pjrt")}
GiB = aot_targets.GiB


def target_devices(target):
  """The devices of `target` (a Target), without hardware."""
  module, wheels = _NEEDS[target.platform]
  if importlib.util.find_spec(module) is None:
    raise RuntimeError(
        f"--target={target.name} needs {wheels} (not found on sys.path nor "
        f"in {AOT_WHEELS}); install them with: {INSTALL}  (set "
        "PLCA_JAX_AOT_WHEELS to use another directory)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.platform == "tpu":
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=target.topology,
        chip_config_name=target.chip_config_name,
        chips_per_host_bounds=target.chips_per_host_bounds, num_slices=1)
  else:
    topology = topologies.get_topology_desc(
        platform="cuda",
        target_config=aot_targets.gpu_target_config(target.chip),
        topology=target.topology)
  devices = list(topology.devices)
  if len(devices) != target.chips:
    raise RuntimeError(f"{target.name}: the topology has {len(devices)} "
                       f"devices, expected {target.chips}")
  return devices


def get_target(name):
  if name not in aot_targets.TARGETS:
    raise ValueError(f"--target={name!r}; expected one of "
                     f"{', '.join(aot_targets.TARGETS)}")
  return aot_targets.TARGETS[name]


# Programs.


def _with_sharding(tree, sharding_):
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_),
      tree)


def batch_specs(config, method, mesh):
  """ShapeDtypeStructs of one update's batch: {domain: {field: (K, B,
  ...)}}, uint8 images (H, W, 3) and label maps (H, W), batch-sharded."""
  k, b = config.train.grad_accum_steps, config.train.batch_size
  h, w = config.data.crop_size
  shapes = {"image": (k, b, h, w, 3)}
  out = {}
  for domain in base.DOMAINS:
    fields = method.batch_fields(domain)
    out[domain] = {f: jax.ShapeDtypeStruct(
        shapes.get(f, (k, b, h, w)), jnp.uint8,
        sharding=sharding.batch_sharding(mesh, 1)) for f in fields}
  return out


def aot_config(config, device_count):
  """The config a run on `device_count` devices uses, without init_from
  (the weights' values do not change the program)."""
  config, notes = schedule.resolve(config, device_count)
  config.init_from = ""
  return config, notes


@dataclasses.dataclass
class Programs:
  """The lowered update (and evaluation step) of a config on a mesh."""
  train: object  # jax.stages.Lowered
  eval: object = None


def lower(config, mesh, with_eval=True):
  """Lowers the update `plca_jax.main` runs on `mesh` (and its eval step)."""
  method = methods.get_method(config)
  replicated = sharding.replicated(mesh)
  state = jax.eval_shape(
      lambda key: train.create_train_state(config, method, key, mesh),
      jax.random.key(config.seed))
  state = _with_sharding(state, replicated)
  key = _with_sharding(jax.eval_shape(lambda: train.step_key(config)),
                       replicated)
  step = train.create_train_step(config, method, mesh)
  lowered = step.lower(state, batch_specs(config, method, mesh), key,
                       method.phase_of(0))
  eval_lowered = None
  if with_eval:
    variables = _with_sharding(jax.eval_shape(
        lambda s: method.eval_variables(train.network_variables(s)), state),
                               replicated)
    n = config.eval.batch_size
    batched = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct(
        (n, *config.data.eval_image_size, 3), jnp.uint8, sharding=batched),
             "label": jax.ShapeDtypeStruct(
                 (n, *config.data.eval_label_size), jnp.uint8,
                 sharding=batched),
             "mask": jax.ShapeDtypeStruct((n,), jnp.bool_,
                                          sharding=batched)}
    eval_step = evaluate.create_eval_step(config, method.eval_model(), mesh)
    eval_lowered = eval_step.lower(variables, batch)
  return Programs(lowered, eval_lowered)


# Analysis of a compiled program.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([0-9,]*)\]")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")
# An instruction: "%name = SHAPE opcode(operands), attributes".
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def collective_kind(opcode):
  """The collective an HLO opcode completes ("all-gather" for all-gather
  and all-gather-done), or None (not a collective, or an async start)."""
  kind = opcode.removesuffix("-done")
  return kind if kind in COLLECTIVES and not opcode.endswith("-start") else (
      None)


def shape_bytes(text):
  """Bytes of every array shape in an HLO shape string (tuples summed)."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    size = math.prod(int(d) for d in dims.split(",") if d)
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def _shapes(text):
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in _SHAPE.findall(text)]


_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
# An attribute naming instructions or computations: calls=, to_apply=,
# body=, condition=, select=, scatter=, branch_computations={...}, ...
_CALLED = re.compile(r"\b([a-z_]+)=(\{[^{}]*\}|%[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(lines):
  """{name: (first line, last line, is entry)} of a module's lines; the
  callees come before their callers, the entry last."""
  out, start = {}, None
  for i, line in enumerate(lines):
    header = _HEADER.match(line)
    if header and start is None:
      start, name, entry = i, header.group(2), bool(header.group(1))
    elif line.startswith("}") and start is not None:
      # "}" or, for a computation of another execution thread (the
      # SparseCore of v5p and v6e), '}, execution_thread="sparsecore"'.
      out[name] = (start, i, entry)
      start = None
  return out


def _trip_count(attributes, condition_text):
  """Iterations of a while loop: its known_trip_count, else the bound of
  a jax loop's condition (`i < N` for one s32 constant N), else None."""
  known = _TRIP.search(attributes)
  if known:
    return int(known.group(1))
  bounds = re.findall(r"s32\[\]\S* constant\((\d+)\)", condition_text)
  if len(bounds) == 1 and "direction=LT" in condition_text:
    return int(bounds[0])
  return None


class HloText:
  """An optimized module's text parsed once: its lines, computations,
  call graph ({caller: [(callee, runs per call of the caller)]}: a while
  loop's body runs its trip count times, 1 if unknown; every other called
  computation once) and the runs of each computation per module run."""

  def __init__(self, text):
    self.text = text
    self.lines = text.splitlines()
    self.computations = _computations(self.lines)
    self.edges = collections.defaultdict(list)
    for name, (first, last, _) in self.computations.items():
      for line in self.lines[first + 1:last]:
        called = dict(_CALLED.findall(line))
        if not called:
          continue
        trips = 1
        if "body" in called and "condition" in called:
          cond = self.computations.get(called["condition"].lstrip("%"))
          cond_text = "\n".join(self.lines[cond[0]:cond[1]]) if cond else ""
          trips = _trip_count(line, cond_text) or 1
        for key, value in called.items():
          for callee in re.findall(r"%([\w.\-]+)", value):
            if callee in self.computations:
              self.edges[name].append((callee, trips if key == "body" else 1))
    self.runs = collections.Counter({
        name: 1 for name, (_, _, entry) in self.computations.items()
        if entry})
    for name in reversed(list(self.computations)):  # callers first
      for callee, trips in self.edges.get(name, ()):
        self.runs[callee] += self.runs[name] * trips
    # Runs per module run of each line's computation (1 outside any).
    self.line_runs = [1] * len(self.lines)
    for name, (first, last, _) in self.computations.items():
      self.line_runs[first:last + 1] = (
          [self.runs.get(name, 1)] * (last - first + 1))

  @property
  def entry(self):
    return next((n for n, (_, _, e) in self.computations.items() if e), None)


def _parsed(hlo):
  return hlo if isinstance(hlo, HloText) else HloText(hlo)


def multiplicity(hlo):
  """{computation: runs per run of the module} (loop bodies times their
  trip counts, nested loops multiplied); `hlo` is text or an HloText."""
  return _parsed(hlo).runs


def loop_extra_cost(hlo, analyse):
  """(FLOPs, bytes) that a cost analysis counting each loop body once
  (XLA's) leaves out: every further iteration of every loop, nested
  loops included. `analyse(module_text)` costs a module (its entry
  computation once); each loop body is costed as a module of its own."""
  hlo = _parsed(hlo)
  comps, edges, lines = hlo.computations, hlo.edges, hlo.lines
  bodies, extras = {}, {}

  def body_text(name):
    keep, stack = set(), [name]
    while stack:  # the body and what it calls
      node = stack.pop()
      if node not in keep:
        keep.add(node)
        stack += [callee for callee, _ in edges.get(node, ())]
    out = ["HloModule loop_body"]
    for comp in comps:  # in the module's order: callees first
      if comp in keep:
        first, last, _ = comps[comp]
        header = lines[first].removeprefix("ENTRY ")
        out += ["ENTRY " + header if comp == name else header,
                *lines[first + 1:last + 1]]
    # Without the module's stack-frame table, frame references dangle.
    return re.sub(r",? ?stack_frame_id=\d+", "", "\n".join(out))

  def analysed(name):
    if name not in bodies:
      bodies[name] = np.array(analyse(body_text(name)), dtype=np.float64)
    return bodies[name]

  def extra(name):
    if name not in extras:
      total = np.zeros(2)
      for callee, trips in edges.get(name, ()):
        if trips > 1:  # a loop body counted once of `trips` runs
          total += trips * (analysed(callee) + extra(callee)) - (
              analysed(callee))
        else:
          total += extra(callee)
      extras[name] = total
    return extras[name]

  if hlo.entry is None:
    return 0.0, 0.0
  flops, bytes_ = extra(hlo.entry)
  return float(flops), float(bytes_)


def hlo_census(hlo):
  """Counts in an optimized HLO module's text.

  Collectives count per run of the module (an async start/done pair is
  one; inside a loop, once per iteration), with the bytes of their
  results; the other counts are of operations in the program text. Host
  callbacks are custom calls to Python callbacks; host transfers are
  send/recv to the host, infeed and outfeed.
  """
  collectives = collections.defaultdict(lambda: [0, 0])
  custom_calls = collections.Counter()
  counts = collections.Counter()
  hlo = _parsed(hlo)
  for line, run in zip(hlo.lines, hlo.line_runs):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    shape, opcode, rest = match.groups()
    kind = collective_kind(opcode)
    if kind:
      collectives[kind][0] += run
      collectives[kind][1] += run * shape_bytes(shape)
    elif opcode == "custom-call":
      target = _TARGET.search(rest)
      name = target.group(1) if target else "?"
      custom_calls[name] += 1
      if "callback" in name.lower():
        counts["host_callbacks"] += 1
    elif opcode == "while":
      counts["while_loops"] += 1
    elif opcode in ("infeed", "outfeed") or (
        opcode in ("send", "recv") and "is_host_transfer=true" in rest):
      counts["host_transfers"] += 1
    elif opcode in ("convolution", "fusion", "sort"):
      counts[opcode + "s"] += 1
  return {"collectives": {k: {"count": c, "bytes": b}
                          for k, (c, b) in sorted(collectives.items())},
          "custom_calls": dict(custom_calls.most_common()),
          "host_callbacks": counts["host_callbacks"],
          "host_transfers": counts["host_transfers"],
          "while_loops": counts["while_loops"],
          "convolutions": counts["convolutions"],
          "fusions": counts["fusions"], "sorts": counts["sorts"]}


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELDS = re.compile(r"(\w+)=(\d+)")


def _stack_tables(lines):
  """The module's stack-frame tables: {frame id: (file, line, function,
  parent frame id)}."""
  tables, current = collections.defaultdict(dict), None
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
      continue
    match = _TABLE_ROW.match(line) if current else None
    if not match:
      if line.startswith(("HloModule", "%", "ENTRY")) or "{" in line[:1]:
        current = None
      continue
    key, value = int(match.group(1)), match.group(2)
    tables[current][key] = (value.strip('"') if current in (
        "FileNames", "FunctionNames") else dict(
            (k, int(v)) for k, v in _FIELDS.findall(value)))
  frames = {}
  for frame_id, frame in tables["StackFrames"].items():
    location = tables["FileLocations"].get(frame.get("file_location_id"), {})
    frames[frame_id] = (
        tables["FileNames"].get(location.get("file_name_id"), "?"),
        location.get("line", 0),
        tables["FunctionNames"].get(location.get("function_name_id"), "?"),
        frame.get("parent_frame_id", 0))
  return frames


def collective_sources(hlo, package="plca_jax"):
  """{kind: {"file:line function": count}}: where in `package` each
  collective of an optimized module comes from (its innermost frame in
  the package; "?" without metadata)."""
  hlo = _parsed(hlo)
  frames = _stack_tables(hlo.lines)
  out = collections.defaultdict(collections.Counter)
  for line in hlo.lines:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    kind = collective_kind(match.group(2))
    if not kind:
      continue
    frame_id = re.search(r"stack_frame_id=(\d+)", line)
    where, seen = "?", set()
    frame_id = int(frame_id.group(1)) if frame_id else 0
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      path, number, function, parent = frames[frame_id]
      if f"/{package}/" in path and not path.endswith(
          ("/aot.py", "/xla.py", "/train.py")):
        where = (f"{path.split(f'/{package}/', 1)[1]}:{number} "
                 f"{function}")
        break
      frame_id = parent
    out[kind][where] += 1
  return {k: dict(v.most_common()) for k, v in sorted(out.items())}


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = ")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")


def gpu_library_flops(hlo):
  """FLOPs of the cuDNN convolutions and cuBLAS products of a GPU module,
  counted from their shapes (XLA's cost analysis leaves custom calls out).

  A convolution's forward, input-gradient and weight-gradient calls each
  cost 2 |y| |W| / C_out (y the forward output, W the kernel); a product
  2 |out| K. Calls inside loops count once per iteration.
  """
  flops = 0
  # Operands are printed by name in the optimized module: their shapes
  # come from the instructions (and parameters) that define them.
  hlo = _parsed(hlo)
  defined = {}
  for line in hlo.lines:
    name = _NAME.match(line)
    match = _INSTRUCTION.match(line)
    if name and match:
      defined[name.group(1)] = match.group(1)
  for line, run in zip(hlo.lines, hlo.line_runs):
    match = _INSTRUCTION.match(line)
    if not match or match.group(2) != "custom-call":
      continue
    result, _, rest = match.groups()
    target = (_TARGET.search(rest) or [None, ""])[1]
    operands = []
    for operand in rest.split(")", 1)[0].split(", "):
      shapes = _shapes(operand)
      if not shapes:
        named = re.search(r"%([\w.\-]+)", operand)
        shapes = _shapes(defined.get(named.group(1), "")) if named else []
      operands += shapes[:1]
    results = _shapes(result)
    if target.startswith("__cudnn$conv"):
      labels = _DIM_LABELS.search(rest)
      if not labels or len(operands) < 2:
        continue
      if "BackwardFilter" in target:
        kernel, y = results[0][1], operands[1][1]
      elif "BackwardInput" in target:
        kernel, y = operands[1][1], operands[0][1]
      else:
        kernel, y = operands[1][1], results[0][1]
      c_out = kernel[labels.group(2).index("o")]
      flops += run * 2 * math.prod(y) * math.prod(kernel) // max(c_out, 1)
    elif target.startswith("__cublas"):
      dims = re.search(r'"lhs_contracting_dimensions":\["?([\d",]*)\]', rest)
      if not dims or not operands:
        continue
      lhs = operands[0][1]
      k = math.prod(lhs[int(d)] for d in dims.group(1).replace('"', "")
                    .split(",") if d)
      flops += run * 2 * math.prod(results[0][1]) * k
  return flops


def forms(lowered):
  """Counts of the forms chosen by platform (xla.form scopes) in a lowered
  program's op names: {form: operations}."""
  text = lowered.as_text(debug_info=True)
  found = re.findall(re.escape(xla.FORM_PREFIX) + r"(\w+)", text)
  return dict(collections.Counter(found))


def memory(compiled):
  """Per-device bytes from XLA's memory analysis; `peak` counts the
  arguments, outputs not aliased to (donated) arguments, temporaries and
  the generated code."""
  m = compiled.memory_analysis()
  out = {"arguments": int(m.argument_size_in_bytes),
         "outputs": int(m.output_size_in_bytes),
         "aliased": int(m.alias_size_in_bytes),
         "temporaries": int(m.temp_size_in_bytes),
         "code": int(m.generated_code_size_in_bytes)}
  out["peak"] = (out["arguments"] + out["outputs"] - out["aliased"] +
                 out["temporaries"] + out["code"])
  return out


def _host_cost(module):
  """(FLOPs, bytes accessed) of an HLO module (object or text) by XLA's
  cost analysis on the host backend."""
  # pylint: disable=g-import-not-at-top
  from jax._src.lib import _jax
  from jaxlib import _hlo
  # pylint: enable=g-import-not-at-top
  if isinstance(module, str):
    module = _hlo.hlo_module_from_text(module)
  host = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return float(host.get("flops", 0)), float(host.get("bytes accessed", 0))


def cost(compiled, platform, hlo):
  """(FLOPs, bytes accessed) per device of one run of the program.

  The platform's cost analysis where it has one (TPU), else XLA's on the
  host backend plus the library calls it cannot see (GPU). Either counts
  a loop body once: the further iterations (micro-batches, chunked
  association rows) are added from the host analysis of each body.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if analysis:
    flops, bytes_accessed = float(analysis.get("flops", 0)), float(
        analysis.get("bytes accessed", 0))
  else:
    flops, bytes_accessed = _host_cost(
        compiled.runtime_executable().hlo_modules()[0])
    if platform == "gpu":
      flops += gpu_library_flops(hlo)
  extra_flops, extra_bytes = loop_extra_cost(hlo, _host_cost)
  return flops + extra_flops, bytes_accessed + extra_bytes


def roofline(flops, bytes_accessed, chip, dtype):
  """Seconds of arithmetic and of memory traffic at the chip's peaks."""
  peak = chip.bf16_flops if dtype == "bfloat16" else chip.matmul_flops
  compute, traffic = flops / peak, bytes_accessed / chip.bandwidth
  return {"compute_s": compute, "memory_s": traffic,
          "estimate_s": max(compute, traffic),
          "bound": "memory" if traffic >= compute else "compute"}


_PASS = re.compile(r'pass_name: "([^"]*)".*?pipeline_name: "([^"]*)".*?'
                   r"start_timestamp_usec: (\d+).*?end_timestamp_usec: (\d+)",
                   re.S)


def pass_timings(dump_dir, top=12):
  """Seconds per HLO pass from XLA's module metadata dump
  (`xla_dump_module_metadata`): {"hlo_passes_s": span of the passes,
  "passes": {pass: seconds} (the `top` slowest, summed over runs)}."""
  per_pass = collections.Counter()
  first, last = None, None
  for name in os.listdir(dump_dir):
    if not name.endswith(".metadata.textproto"):
      continue
    with open(os.path.join(dump_dir, name)) as f:
      text = f.read()
    for pass_name, _, start, end in _PASS.findall(text):
      start, end = int(start), int(end)
      per_pass[pass_name] += end - start
      first = start if first is None else min(first, start)
      last = end if last is None else max(last, end)
  if first is None:
    return None
  return {"hlo_passes_s": round((last - first) / 1e6, 1),
          "passes": {k: round(v / 1e6, 2)
                     for k, v in per_pass.most_common(top)}}


def analyse(lowered, target, dtype, compile_s, profile_dir=None):
  options = None
  if profile_dir:  # per-pass timings (XLA writes them with the dump)
    options = {"xla_dump_to": profile_dir, "xla_dump_module_metadata": True,
               "xla_dump_hlo_as_text": False}
  compiled = lowered.compile(compiler_options=options)
  seconds = compile_s()
  hlo = HloText(compiled.as_text())
  flops, bytes_accessed = cost(compiled, target.platform, hlo)
  mem = memory(compiled)
  chip = target.spec
  timings = pass_timings(profile_dir) if profile_dir else None
  found = forms(lowered)
  # What the update's tensors need at least: every argument read, every
  # output written, every temporary buffer written once and read once.
  tensors = mem["arguments"] + mem["outputs"] + 2 * mem["temporaries"]
  return {"compile_s": seconds, "compile_passes": timings, "memory": mem,
          "tensor_bytes_estimate": tensors,
          "fits": mem["peak"] <= chip.memory,
          "margin_bytes": chip.memory - mem["peak"],
          "flops": flops, "bytes_accessed": bytes_accessed,
          "roofline": roofline(flops, bytes_accessed, chip, dtype),
          "forms": found,
          "cpu_forms": {k: v for k, v in found.items() if k in xla.CPU_FORMS},
          "collective_sources": collective_sources(hlo), **hlo_census(hlo)}


def _timer():
  start = time.perf_counter()
  return lambda: round(time.perf_counter() - start, 1)


def compile_update(config, target, devices=None, with_eval=True,
                   profile_dir=None):
  """Lowers and compiles the update (and eval step) for `target`; with
  `profile_dir`, XLA's dump of the update's compilation goes there and its
  per-pass timings into the analysis.

  Returns:
    (resolved config, notes, {"train": analysis, "eval": analysis}).
  """
  devices = devices or target_devices(target)
  mesh = sharding.create_mesh(devices)
  config, notes = aot_config(config, mesh.size)
  dtype = config.train.compute_dtype
  elapsed = _timer()
  programs = lower(config, mesh, with_eval)
  lower_s = elapsed()
  elapsed = _timer()
  out = {"train": analyse(programs.train, target, dtype, elapsed,
                         profile_dir)}
  out["train"]["lower_s"] = lower_s
  if with_eval:
    elapsed = _timer()
    out["eval"] = analyse(programs.eval, target, dtype, elapsed)
  return config, notes, out


def _micro_batch_config(config, per_device, chips):
  config = copy.deepcopy(config)
  config.train.auto_split = False
  config.train.batch_size = per_device * chips
  config.train.grad_accum_steps = 1
  return config


def search_micro_batch(peak, limit, most=256):
  """The largest n in [0, most] with peak(n) <= limit, for a peak that
  grows with n; `peak` is called once per n.

  peak(1) and peak(2), then the n where the line through the two largest
  n that fit crosses the limit; when that n fits and the line through it
  puts n + 1 over, n is the answer (a linear peak: 1, 2 and the fit, the
  last compile confirming it). Once an n does not fit, the next is
  halfway between where the chord from the largest n that fits to the
  smallest that does not crosses the limit (below the answer for a peak
  that grows faster than linearly) and that smallest n, until the two
  are neighbours.
  """
  seen = {}

  def at(n):
    if n not in seen:
      seen[n] = peak(n)
    return seen[n]

  def crossing(a, b):  # where the line through (a, b) reaches the limit
    slope = (at(b) - at(a)) / (b - a)
    if slope <= 0:
      return most
    return int(a + (limit - at(a)) / slope)

  if at(1) > limit:
    return 0
  if at(2) > limit:
    return 1
  lo, prev, hi = 2, 1, most + 1  # hi: the smallest n known not to fit
  while hi > lo + 1:
    if hi > most:
      n = crossing(prev, lo)
      if n <= lo:  # the line through the two largest that fit: lo + 1
        return lo  # is over
    else:
      n = (crossing(lo, hi) + hi) // 2
    n = min(max(n, lo + 1), hi - 1)
    if at(n) <= limit:
      lo, prev = n, lo
    else:
      hi = n
  return lo


_OVER_MEMORY = re.compile(
    r"RESOURCE_EXHAUSTED: Ran out of memory.*?(?:required for [^(]*\(|"
    r"Used )([\d.]+)([KMGT])")


def over_memory_bytes(error_text):
  """The bytes a TPU compile refused for want of memory says the program
  needs (libtpu's RESOURCE_EXHAUSTED error), or None for any other text."""
  match = _OVER_MEMORY.search(error_text)
  if not match:
    return None
  return int(float(match.group(1)) * 1024**"KMGT".index(match.group(2)) *
             1024)


def error_summary(text, lines=5):
  """The last `lines` error lines of a failed compile's output (its last
  lines when none names an error)."""
  text_lines = text.strip().splitlines()
  errors = [l for l in text_lines if "Error" in l or "error:" in l]
  return "\n".join((errors or text_lines)[-lines:])


def refused_peak(error_text, what):
  """The bytes a compile that failed with `error_text` needs per device,
  when the TPU compiler refused it for memory (the micro-batch search
  counts it as not fitting, at that peak); any other failure raises
  RuntimeError naming `what`."""
  needs = over_memory_bytes(error_text)
  if needs is None:
    raise RuntimeError(f"{what}: the compile failed:\n"
                       f"{error_summary(error_text)}")
  return needs


def largest_micro_batch(config, target, devices, known=None):
  """The largest micro-batch per device (images per domain) whose update
  fits the chip (`search_micro_batch` over one-micro-batch updates); a
  compile the TPU compiler refuses for memory counts as not fitting.
  `known`: {images per device: peak bytes} already compiled.

  Returns:
    {"images_per_device", "compiles": [(images, peak bytes)]}.
  """
  chips = len(devices)
  peaks = dict(known or {})

  def peak(n):
    if n not in peaks:
      try:
        _, _, out = compile_update(_micro_batch_config(config, n, chips),
                                   target, devices, with_eval=False)
        peaks[n] = out["train"]["memory"]["peak"]
      except jax.errors.JaxRuntimeError as error:
        peaks[n] = refused_peak(
            str(error), f"{target.name} at {n} image(s) per device")
      logging.info("%d image(s) per device: peak %.2f GiB", n,
                   peaks[n] / GiB)
    return peaks[n]

  n = search_micro_batch(peak, target.spec.memory)
  return {"images_per_device": n, "compiles": sorted(peaks.items())}


def known_peaks(train, chips, peak):
  """{images per device: `peak`} for an update compiled with the train
  settings `train` (config.train, or its JSON in a report) when it is one
  micro-batch (the search's own form), else {}."""
  if train["grad_accum_steps"] != 1:
    return {}
  return {train["batch_size"] // chips: peak}


# The report.


def _gib(n):
  return f"{n / GiB:.2f} GiB"


def format_report(name, config, notes, results, search):
  target = get_target(name)
  chip = target.spec
  lines = [f"plca_jax.aot: {config.method} update of {config.model.name} "
           f"R{config.model.depth} at {tuple(config.data.crop_size)}, "
           f"{config.train.compute_dtype}, remat {config.model.remat} on "
           f"{name} ({target.chips} x {chip.name}, {target.hosts} host(s))",
           f"  update: {config.train.grad_accum_steps} micro-batch(es) of "
           f"{config.train.batch_size} images per domain "
           f"({config.train.batch_size // target.chips} per device)"]
  lines += [f"  note: {n}" for n in notes]
  for program, r in results.items():
    m = r["memory"]
    roof = r["roofline"]
    fits = ("fits" if r["fits"] else "DOES NOT FIT") + (
        f" ({_gib(abs(r['margin_bytes']))} "
        f"{'to spare' if r['fits'] else 'over'})")
    lines += [
        f"{program} step (per device; compiled in {r['compile_s']} s):",
        *([f"  compile: HLO passes {r['compile_passes']['hlo_passes_s']} s "
           f"(slowest: " + ", ".join(
               f"{k} {v} s" for k, v in list(
                   r["compile_passes"]["passes"].items())[:6]) +
           f"), code generation and the rest "
           f"{r['compile_s'] - r['compile_passes']['hlo_passes_s']:.1f} s"]
          if r.get("compile_passes") else []),
        f"  memory: arguments {_gib(m['arguments'])}, outputs "
        f"{_gib(m['outputs'])} ({_gib(m['aliased'])} aliased), temporaries "
        f"{_gib(m['temporaries'])}, code {_gib(m['code'])}; peak "
        f"{_gib(m['peak'])} of {_gib(chip.memory)}: {fits}",
        f"  cost: {r['flops'] / 1e12:.3f} TFLOP, "
        f"{r['bytes_accessed'] / GiB:.2f} GiB accessed (the tensors: "
        f"{r['tensor_bytes_estimate'] / GiB:.2f} GiB, each buffer written "
        "and read once); roofline "
        f"{roof['estimate_s'] * 1e3:.1f} ms ({roof['bound']}-bound: "
        f"arithmetic {roof['compute_s'] * 1e3:.1f} ms, memory "
        f"{roof['memory_s'] * 1e3:.1f} ms)",
        "  collectives per update: " + (", ".join(
            f"{k} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
            for k, v in r["collectives"].items()) or "none"),
        *[f"    {kind} from: " + ", ".join(
            f"{where} x{n}" for where, n in list(sources.items())[:4])
          for kind, sources in r["collective_sources"].items()],
        f"  host callbacks {r['host_callbacks']}, host transfers "
        f"{r['host_transfers']}, while loops {r['while_loops']}, sorts "
        f"{r['sorts']}, fusions {r['fusions']}, convolutions "
        f"{r['convolutions']}",
        "  custom calls: " + (", ".join(
            f"{k} x{v}" for k, v in r["custom_calls"].items()) or "none"),
        "  forms: " + (", ".join(
            f"{k} x{v}" for k, v in r["forms"].items()) or "none") +
        " (CPU-only: " + (", ".join(r["cpu_forms"]) or "none") + ")"]
  train_result = results["train"]
  images = config.train.batch_size * config.train.grad_accum_steps
  rate = aot_targets.images_per_second(
      images, target.chips, train_result["roofline"]["estimate_s"])
  lines.append(f"roofline: {rate:.2f} images per domain per second per "
               f"device ({images} per update)")
  if search:
    lines.append(f"largest micro-batch per device that fits: "
                 f"{search['images_per_device']} images per domain "
                 f"(compiled at {[n for n, _ in search['compiles']]})")
  return "\n".join(lines)


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("target", None, "The slice or GPU box to compile for: "
                    + ", ".join(aot_targets.TARGETS))
flags.DEFINE_string("workdir", None, "Writes aot_<target>.json here.")
flags.DEFINE_bool("eval", True, "Also compile the evaluation step.")
flags.DEFINE_string("profile_compile", None, "Directory for XLA's dump "
                    "of the update's compilation; prints per-pass timings.")
flags.DEFINE_bool("search_batch", True, "Find the largest micro-batch per "
                  "device that fits (two to five more compiles).")
flags.mark_flags_as_required(["config", "target"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  target = get_target(FLAGS.target)
  try:
    devices = target_devices(target)
  except RuntimeError as error:
    sys.stderr.write(f"plca_jax.aot: {error}\n")
    sys.exit(2)
  logging.info("Compiling for %s: %s", target.name, devices[0].device_kind)
  try:
    config, notes, results = compile_update(
        FLAGS.config, target, devices, with_eval=FLAGS.eval,
        profile_dir=FLAGS.profile_compile)
  except jax.errors.JaxRuntimeError as error:
    needs = over_memory_bytes(str(error))
    if needs is None:
      raise
    sys.stderr.write(
        f"plca_jax.aot: the update does not fit {target.name}: the compiler "
        f"needs {_gib(needs)} per device of {_gib(target.spec.memory)} "
        f"({_gib(needs - target.spec.memory)} over). More micro-batches "
        "(--config.train.grad_accum_steps) or "
        "--config.train.compute_dtype=bfloat16 need less.\n"
        f"{str(error).splitlines()[0]}\n")
    sys.exit(1)
  search = (largest_micro_batch(
      config, target, devices,
      known_peaks(config.train, target.chips,
                  results["train"]["memory"]["peak"]))
            if FLAGS.search_batch else None)
  print(format_report(target.name, config, notes, results, search),
        flush=True)
  if FLAGS.workdir:
    os.makedirs(FLAGS.workdir, exist_ok=True)
    path = os.path.join(FLAGS.workdir, f"aot_{target.name}.json")
    record = {"target": target.name, "chip": dataclasses.asdict(target.spec),
              "chips": target.chips, "hosts": target.hosts,
              "config": json.loads(config.to_json_best_effort()),
              "notes": notes, "programs": results,
              "largest_micro_batch": search}
    with open(path, "w") as f:
      json.dump(record, f, indent=1, default=_json_default)
    print(f"Report: {path}")


def _json_default(value):
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  return str(value)


if __name__ == "__main__":
  app.run(main)
