"""Tests of plca_jax.aot: the TPU and GPU programs, compiled on this host.

The tiny test config's update is compiled for a TPU v5e slice of 4 chips
and for one H100 by `python -m plca_jax.aot`, as a user runs it; the AOT
wheels (libtpu, the CUDA plugin: requirements-aot.txt) are installed into
their own directory first if they are not there (`aot.AOT_WHEELS`).
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import test as test_config
from plca_jax import aot
from plca_jax import aot_targets
from plca_jax import sharding
from plca_jax import xla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPORTS = {}


def setUpModule():
  """Installs the AOT wheels into aot.AOT_WHEELS unless they are there."""
  have = all(os.path.isdir(os.path.join(aot.AOT_WHEELS, name))
             for name in ("libtpu", "jax_cuda12_plugin"))
  if not have:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--no-deps", "--upgrade",
                    "--target", aot.AOT_WHEELS, "-r",
                    os.path.join(REPO, "requirements-aot.txt")], check=True)


def _aot_env():
  # The tests' XLA:CPU flags (conftest.py) are not the accelerators'.
  return {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}


def report(target, *overrides):
  """The JSON report of `python -m plca_jax.aot` for the test config."""
  key = (target, overrides)
  if key not in _REPORTS:
    workdir = tempfile.mkdtemp()
    proc = subprocess.run(
        [sys.executable, "-m", "plca_jax.aot", "--config=configs/test.py",
         f"--target={target}", f"--workdir={workdir}", "--nosearch_batch",
         *overrides], cwd=REPO, env=_aot_env(), capture_output=True,
        text=True, check=False)
    if proc.returncode:
      raise AssertionError(f"plca_jax.aot failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, f"aot_{target}.json")) as f:
      _REPORTS[key] = (json.load(f), proc.stdout)
  return _REPORTS[key]


def lovasz_bytes(config, chips):
  """Bytes the Lovasz term of an update must move between devices: each
  micro-batch's class columns (P x M float32) and labels (P int32)."""
  k = config.train.grad_accum_steps
  h, w = config.data.crop_size
  pixels = config.train.batch_size * h * w
  return k * pixels * (4 * config.model.num_classes + 4) * chips


@pytest.mark.slow
class TpuProgramTest(absltest.TestCase):

  def test_tpu_update_is_data_parallel_without_cpu_forms(self):
    record, stdout = report("tpu-v5e-4", "--config.train.batch_size=4")
    train = record["programs"]["train"]
    self.assertIn("train step (per device", stdout)
    self.assertEqual(record["chips"], 4)
    self.assertEqual(train["cpu_forms"], {})
    # The ASPP head as one product per tap: libtpu lowers them in seconds,
    # each of its dilated convolutions in minutes.
    self.assertEqual(set(train["forms"]), {"head_taps"})
    self.assertEqual(train["host_callbacks"], 0)
    self.assertEqual(train["host_transfers"], 0)
    self.assertTrue(train["fits"])
    self.assertGreater(train["flops"], 0)
    self.assertGreater(train["roofline"]["estimate_s"], 0)
    # Gradients and BatchNorm moments (all-reduce), the Lovasz term's class
    # columns (one all-to-all per micro-batch and its gradient's) and
    # labels (an all-gather, which XLA:TPU may write as an all-reduce);
    # nothing partitioned over space (no collective-permute), no
    # reduce-scatter, no gather of a map per consumer.
    kinds = train["collectives"]
    self.assertLessEqual(set(kinds), {"all-gather", "all-reduce",
                                      "all-to-all"})
    self.assertIn("all-reduce", kinds)
    k = record["config"]["train"]["grad_accum_steps"]
    self.assertEqual(kinds["all-to-all"]["count"], 2 * k)
    config = test_config.get_config()
    config.train.batch_size = 4
    moved = sum(kinds[kind]["bytes"] for kind in ("all-gather", "all-to-all")
                if kind in kinds)
    self.assertLessEqual(moved, 3 * lovasz_bytes(config, 4))
    self.assertIn("eval", record["programs"])
    self.assertEqual(record["programs"]["eval"]["cpu_forms"], {})

  def test_libtpu_refuses_a_program_over_memory_with_its_bytes(self):
    # The search reads what libtpu's out-of-memory error says a program
    # needs: 6 GiB of float32 output per chip of a v5e (15.75 GiB).
    code = "\n".join([
        "import os, sys",
        "os.environ['JAX_PLATFORMS'] = 'cpu'",
        "os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')",
        "from plca_jax import aot",
        "sys.path.insert(0, aot.AOT_WHEELS)",
        "import jax, jax.numpy as jnp",
        "devices = aot.target_devices(aot.get_target('tpu-v5e-4'))[:1]",
        "mesh = jax.sharding.Mesh(devices, ('x',))",
        "s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())",
        "x = jax.ShapeDtypeStruct((2**28,), jnp.float32, sharding=s)",
        "f = jax.jit(lambda x: jnp.concatenate([x * i for i in range(24)]),",
        "            out_shardings=s)",
        "try:",
        "  f.lower(x).compile()",
        "  print('compiled')",
        "except jax.errors.JaxRuntimeError as error:",
        "  print('needs', aot.over_memory_bytes(str(error)))"])
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          env=_aot_env(), capture_output=True, text=True,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertRegex(proc.stdout, r"^needs \d+", proc.stderr[-2000:])
    self.assertGreaterEqual(int(proc.stdout.split()[1]), 24 * 2**30)

  def test_tpu_update_scans_its_micro_batches(self):
    record, _ = report("tpu-v5e-4", "--config.train.batch_size=4")
    self.assertEqual(record["config"]["train"]["grad_accum_steps"], 2)
    self.assertGreater(record["programs"]["train"]["while_loops"], 0)


@pytest.mark.slow
class GpuProgramTest(absltest.TestCase):

  def test_gpu_update_uses_cudnn_and_no_cpu_forms(self):
    record, _ = report("gpu-h100-80gb", "--noeval")
    train = record["programs"]["train"]
    self.assertEqual(train["forms"], {})  # the head's convolutions on cuDNN
    self.assertEqual(train["host_callbacks"], 0)
    self.assertEqual(train["collectives"], {})  # one GPU
    convolutions = {k: v for k, v in train["custom_calls"].items()
                    if k.startswith("__cudnn$conv")}
    self.assertGreater(sum(convolutions.values()), 0)
    self.assertTrue(any("BackwardFilter" in k for k in convolutions))
    self.assertGreater(train["flops"], 0)


_RESIZE_ON_GPU = """
import os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
from plca_jax import aot
sys.path.insert(0, aot.AOT_WHEELS)
import jax, jax.numpy as jnp
from plca_jax import xla
from plca_jax.losses import segmentation
device = aot.target_devices(aot.get_target("gpu-h100-80gb"))[0]
x = jax.ShapeDtypeStruct((4, 92, 92, 19), jnp.float32,
                         sharding=jax.sharding.SingleDeviceSharding(device))
grad = jax.grad(lambda x: jnp.sum(
    segmentation.upsample_bilinear(x, (730, 730)) ** 2))
for options in ({}, xla.compiler_options("gpu")):
  try:
    jax.jit(grad, compiler_options=options).lower(x).compile()
    print("compiled", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print("failed:", str(e).splitlines()[0][:200], flush=True)
"""


class GpuCompilerOptionsTest(absltest.TestCase):

  def test_the_gpu_options_compile_the_paper_resize(self):
    # configs/gta5.py's upsampling of 19 class maps to 730x730: XLA:GPU's
    # Triton GEMM emitter finds no tiling for its products; with the GPU
    # programs' options (cuBLAS) it compiles.
    proc = subprocess.run([sys.executable, "-c", _RESIZE_ON_GPU], cwd=REPO,
                          env=_aot_env(), capture_output=True, text=True,
                          check=False)
    lines = [l for l in proc.stdout.splitlines()
             if l.startswith(("compiled", "failed"))]
    self.assertEqual(len(lines), 2, proc.stderr[-2000:])
    self.assertTrue(lines[0].startswith("failed"), lines[0])
    self.assertEqual(lines[1], "compiled")


class MissingWheelTest(absltest.TestCase):

  def test_a_target_without_its_wheel_names_the_pip_command(self):
    env = {**_aot_env(), "PLCA_JAX_AOT_WHEELS": "/nonexistent"}
    proc = subprocess.run(
        [sys.executable, "-m", "plca_jax.aot", "--config=configs/test.py",
         "--target=tpu-v5e-8"], cwd=REPO, env=env, capture_output=True,
        text=True, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("--target=tpu-v5e-8 needs libtpu", proc.stderr)
    self.assertIn("pip install --no-deps --target /nonexistent",
                  proc.stderr)

  def test_unknown_target_lists_the_targets(self):
    with self.assertRaisesRegex(ValueError, "tpu-v5e-8.*gpu-h100-80gb"):
      aot.get_target("tpu-v9")


class CpuProgramTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    # Lowered (not compiled) CPU programs of the test config's update.
    super().setUpClass()
    mesh = sharding.create_mesh(jax.devices()[:1])
    cls.lowered = {}
    for name, overrides in (
        ("as_shipped", dict(lovasz_sort="auto")),
        ("default_precision", dict(association_precision="default")),
        ("scan", dict(micro_batch_loop="scan"))):
      config = test_config.get_config()
      for key, value in overrides.items():
        block = config.train if key == "micro_batch_loop" else config.loss
        block[key] = value
      config, _ = aot.aot_config(config, 1)
      cls.lowered[name] = aot.lower(config, mesh, with_eval=False).train
    cls.grad_accum_steps = config.train.grad_accum_steps

  def test_the_cpu_program_keeps_its_forms(self):
    forms = aot.forms(self.lowered["as_shipped"])
    self.assertEqual(sorted(forms), ["block_barrier", "dot_weight_grad",
                                     "head_product", "host_sort"])
    self.assertEqual(sorted(set(forms) & set(xla.CPU_FORMS)),
                     sorted(xla.CPU_FORMS))

  def test_scan_puts_one_copy_of_the_pass_in_the_program(self):
    # Two micro-batches: the loop's program (the CPU's choice) holds two
    # copies of the forward and backward pass, the scan's one.
    self.assertEqual(self.grad_accum_steps, 2)
    loop = self.lowered["as_shipped"].as_text().count("stablehlo.convolution")
    scan = self.lowered["scan"].as_text().count("stablehlo.convolution")
    self.assertGreater(scan, 0)
    self.assertGreater(loop, 1.8 * scan)

  def test_association_products_carry_the_configured_precision(self):
    # (jax.image.resize's products are HIGHEST in both.)
    counts = {name: self.lowered[name].as_text().count(
        "precision = [HIGHEST, HIGHEST]")
              for name in ("as_shipped", "default_precision")}
    self.assertGreater(counts["as_shipped"], counts["default_precision"] + 10)


class AnalysisTest(absltest.TestCase):

  def test_census_counts_async_pairs_once_with_their_bytes(self):
    hlo = "\n".join([
        "  %ag-start = (f32[4]{0}, f32[16]{0}) all-gather-start(f32[4]{0} "
        "%p), dimensions={0}",
        "  %ag-done = f32[16]{0} all-gather-done((f32[4]{0}, f32[16]{0}) "
        "%ag-start)",
        "  %ar = bf16[8,2]{1,0} all-reduce(bf16[8,2]{1,0} %x), to_apply=%add",
        "  ROOT %cb = f32[3]{0} custom-call(f32[3]{0} %y), "
        'custom_call_target="xla_ffi_python_cpu_callback"',
        "  %w = (s32[], f32[2]{0}) while((s32[], f32[2]{0}) %t), "
        "condition=%c, body=%b",
        "  %r = (f32[2]{0}, u32[], token[]) recv(token[] %tok), "
        "is_host_transfer=true"])
    census = aot.hlo_census(hlo)
    self.assertEqual(census["collectives"], {
        "all-gather": {"count": 1, "bytes": 64},
        "all-reduce": {"count": 1, "bytes": 32}})
    self.assertEqual(census["host_callbacks"], 1)
    self.assertEqual(census["while_loops"], 1)
    self.assertEqual(census["host_transfers"], 1)
    self.assertEqual(census["custom_calls"],
                     {"xla_ffi_python_cpu_callback": 1})

  def test_loop_bodies_count_once_per_iteration(self):
    # A loop of 4 whose body holds a loop of 3 against the same products
    # unrolled: XLA's analysis of the loop program counts each body once;
    # with the iterations it leaves out, the FLOPs are the unrolled ones.
    x = jnp.ones((32, 32))

    def looped(x):
      def outer(c, _):
        c = jax.lax.scan(lambda d, _: (jnp.tanh(d @ d), None), c, None,
                         length=3)[0]
        return c @ c, None
      return jax.lax.scan(outer, x, None, length=4)[0]

    def unrolled(x):
      for _ in range(4):
        for _ in range(3):
          x = jnp.tanh(x @ x)
        x = x @ x
      return x

    compiled = jax.jit(looped).lower(x).compile()
    text = compiled.as_text()
    self.assertEqual(sorted(aot.multiplicity(text).values())[-1], 12)
    once = aot._host_cost(compiled.runtime_executable().hlo_modules()[0])
    extra = aot.loop_extra_cost(text, aot._host_cost)
    self.assertEqual(
        aot._host_cost(jax.jit(unrolled).lower(x).compile()
                       .runtime_executable().hlo_modules()[0])[0],
        16 * 2 * 32**3)
    self.assertLess(once[0], 0.2 * 16 * 2 * 32**3)
    np.testing.assert_allclose(once[0] + extra[0], 16 * 2 * 32**3,
                               rtol=1e-3)

  def test_census_counts_collectives_per_iteration(self):
    # A body with one all-reduce in a loop of 5: known_trip_count, or the
    # bound of the condition when the backend drops it (XLA:TPU).
    # A SparseCore computation (v5p, v6e) ends in "}, execution_thread=".
    sparsecore = ["%offload (p: f32[8]) -> f32[8] {",
                  "  ROOT %n = f32[8]{0} negate(f32[8]{0} %p)",
                  '}, execution_thread="sparsecore"']
    for trip in ('backend_config={"known_trip_count":{"n":"5"}}', ""):
      hlo = "\n".join(sparsecore + [
          "%cond (p: (s32[], f32[8])) -> pred[] {",
          "  %c = s32[]{:T(128)} constant(5)",
          "  %i = s32[] get-tuple-element((s32[], f32[8]{0}) %p), index=0",
          "  ROOT %lt = pred[] compare(s32[] %i, s32[] %c), direction=LT",
          "}",
          "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
          "  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add",
          "  ROOT %t = (s32[], f32[8]{0}) tuple(s32[] %i, f32[8]{0} %ar)",
          "}",
          "ENTRY %main (a: f32[8]) -> f32[8] {",
          "  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %t0), "
          "condition=%cond, body=%body" + (", " + trip if trip else ""),
          "  ROOT %ar2 = f32[8]{0} all-reduce(f32[8]{0} %y), to_apply=%add",
          "}"])
      census = aot.hlo_census(hlo)
      self.assertEqual(census["collectives"],
                       {"all-reduce": {"count": 6, "bytes": 6 * 32}}, trip)
      self.assertEqual(census["while_loops"], 1)

  def test_cudnn_convolution_flops_from_shapes(self):
    # y (2, 8, 8, 16) from x (2, 8, 8, 4) and a 3x3x4x16 kernel: forward,
    # input gradient and weight gradient each 2 * |y| * 3 * 3 * 4.
    expected = 2 * (2 * 8 * 8 * 16) * 3 * 3 * 4
    lines = [
        "  %f = (f32[2,8,8,16]{3,2,1,0}, u8[0]{0}) custom-call("
        "f32[2,8,8,4]{3,2,1,0} %x, f32[3,3,4,16]{3,2,1,0} %k), "
        "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, "
        'custom_call_target="__cudnn$convForward"',
        "  %i = (f32[2,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call("
        "f32[2,8,8,16]{3,2,1,0} %dy, f32[3,3,4,16]{3,2,1,0} %k), "
        "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, "
        'custom_call_target="__cudnn$convBackwardInput"',
        "  %w = (f32[3,3,4,16]{3,2,1,0}, u8[0]{0}) custom-call("
        "f32[2,8,8,4]{3,2,1,0} %x, f32[2,8,8,16]{3,2,1,0} %dy), "
        "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, "
        'custom_call_target="__cudnn$convBackwardFilter"']
    for line in lines:
      self.assertEqual(aot.gpu_library_flops(line), expected, line)

  def test_largest_micro_batch_search_fits_and_confirms(self):
    limit = 100
    compiles = []

    def peak(n):  # 10 + 17 n bytes: 5 images fit
      compiles.append(n)
      return 10 + 17 * n

    self.assertEqual(aot.search_micro_batch(peak, limit), 5)
    self.assertEqual(compiles, [1, 2, 5])  # the fit, confirmed
    self.assertEqual(aot.search_micro_batch(lambda n: 200 * n, limit), 0)
    # A peak that grows faster than linearly (the fit overshoots).
    for quadratic in (lambda n: 10 + n * n, lambda n: 10 + 3 * n + n * n):
      compiles.clear()
      found = aot.search_micro_batch(
          lambda n, f=quadratic: compiles.append(n) or f(n), limit)
      self.assertEqual(found, max(n for n in range(1, 20)
                                  if quadratic(n) <= limit))
      self.assertLessEqual(len(compiles), 7)
    # Two images do not fit: no fit from a refused compile's figure.
    compiles.clear()
    self.assertEqual(aot.search_micro_batch(
        lambda n: compiles.append(n) or 60 * n, limit), 1)
    self.assertEqual(compiles, [1, 2])

  def test_a_refused_compile_names_the_bytes_it_needed(self):
    for text, gib in [
        ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
         "required for HLO temporaries (24.00G) exceeds available HBM "
         "(15.75G).", 24.0),
        ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used "
         "20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.", 20.5)]:
      self.assertEqual(aot.over_memory_bytes(text), int(gib * 2**30))
    self.assertIsNone(aot.over_memory_bytes("INTERNAL: something else"))
    self.assertEqual(aot.refused_peak(text, "x"), int(gib * 2**30))
    with self.assertRaisesRegex(RuntimeError, "(?s)v5e at 3 image.*"
                                "INTERNAL: something else"):
      aot.refused_peak("noise\nINTERNAL: something else\n", "v5e at 3 image")

  def test_known_peaks_from_a_config_or_its_json(self):
    config = ml_collections.ConfigDict(
        {"grad_accum_steps": 1, "batch_size": 16})
    self.assertEqual(aot.known_peaks(config, 8, 5), {2: 5})
    self.assertEqual(aot.known_peaks(config.to_dict(), 8, 5), {2: 5})
    config.grad_accum_steps = 2  # not the search's form: nothing known
    self.assertEqual(aot.known_peaks(config, 8, 5), {})

  def test_table_search_resumes_from_kept_compiles(self):
    # benchmarks/aot_table.py's search with the compiler replaced: on a
    # 15.75 GiB chip, 7, 9 and 13 GiB per device at 1 (the update
    # itself), 2 and 3 images; from 4 on the compiler refuses, naming
    # 3 + 4 n GiB (as libtpu does). The fit through 1 and 2 says 5.
    from benchmarks import aot_table  # pylint: disable=g-import-not-at-top
    workdir = tempfile.mkdtemp()
    path = os.path.join(workdir, "x.json")
    gib = 2**30
    with open(path, "w") as f:
      json.dump({"chips": 8, "config": {"train": {
          "grad_accum_steps": 1, "batch_size": 8}}, "programs": {
              "train": {"memory": {"peak": 7 * gib}}}}, f)
    calls = []

    def fake(config, target, out_dir, timeout, *overrides):
      del config, timeout
      n = int(overrides[1].split("=")[1]) // 8
      calls.append(n)
      if n >= 4:
        return None, ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the "
                      f"total memory required for x ({3 + 4 * n}.00G)")
      record = {"programs": {"train": {"memory": {
          "peak": {2: 9, 3: 13}[n] * gib}}}}
      os.makedirs(out_dir)
      with open(os.path.join(out_dir, f"aot_{target}.json"), "w") as f:
        json.dump(record, f)
      return record, ""

    real = aot_table._aot
    aot_table._aot = fake
    try:
      aot_table.search("synthia", "tpu-v5e-8", workdir, path, 60)
      self.assertEqual(calls, [2, 5, 4, 3])
      with open(path) as f:
        found = json.load(f)["largest_micro_batch"]
      self.assertEqual(found["images_per_device"], 3)
      self.assertEqual(found["compiles"], [
          [1, 7 * gib], [2, 9 * gib], [3, 13 * gib], [4, 19 * gib],
          [5, 23 * gib]])
      calls.clear()  # again: every compile is kept, refused ones too
      aot_table.search("synthia", "tpu-v5e-8", workdir, path, 60)
      self.assertEqual(calls, [])
      with open(path) as f:
        self.assertEqual(json.load(f)["largest_micro_batch"], found)
    finally:
      aot_table._aot = real

  def test_targets_cite_their_figures(self):
    for name, target in aot_targets.TARGETS.items():
      chip = target.spec
      self.assertTrue(chip.source.startswith("https://"), name)
      self.assertGreater(chip.bf16_flops, chip.bandwidth, name)
      self.assertIn(target.platform, ("tpu", "gpu"), name)
    text = aot_targets.gpu_target_config("h100-80gb")
    self.assertIn("core_count: 132", text)
    self.assertIn("cuda_compute_capability { major: 9 minor: 0 }", text)

  def test_roofline_is_the_slower_of_arithmetic_and_traffic(self):
    chip = aot_targets.CHIPS["tpu-v5e"]
    r = aot.roofline(chip.bf16_flops, chip.bandwidth * 2, chip, "bfloat16")
    np.testing.assert_allclose([r["compute_s"], r["memory_s"],
                                r["estimate_s"]], [1.0, 2.0, 2.0])
    self.assertEqual(r["bound"], "memory")


if __name__ == "__main__":
  absltest.main()
