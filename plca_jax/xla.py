"""Backend-specific XLA settings, the host allocator and the CPU device
count, in one place.

XLA:CPU needs two changes to run the ResNet backward near PyTorch's speed
(benchmarks/step.py --cpu_kernels=both); neither applies to GPU or TPU,
where XLA uses cuDNN / emits convolution gradients natively:
- convolutions go to XLA's own (Eigen) kernels instead of YNNPACK, whose
  weight-gradient convolutions (a window over the whole output gradient)
  were 1.5-6x slower;
- `lax.optimization_barrier` survives to the fusion passes (XLA:CPU's
  `cse_barrier_expander` removes it first), so the block outputs the model
  materialises (`ResNet.block_barrier`) stay materialised.
The model's own CPU forms (weight gradients as matrix products,
`ResNet.dot_weight_grads`) and the Lovasz loss's host sort are chosen with
the same test, `on_cpu()`; the ASPP head's form (`DeepLabV2.head_form`)
by `target_platform()`.

Every such choice follows the platform of the program being built, not the
host's default backend: `create_train_step` and `create_eval_step` trace
their function inside `building_for(mesh)`, so a TPU or GPU program
compiled ahead of time on a CPU host (plca_jax.aot) is the program that
TPU or GPU would run.
"""

import contextlib
import contextvars
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys

import jax

_CPU_OPTIONS = {
    # Dots and reductions stay with YNNPACK; convolutions leave it.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander",
}


# The mesh of the program being traced, if one is.
_BUILDING = contextvars.ContextVar("plca_jax_building_for", default=None)


def platform_of(mesh):
  """The platform ("cpu", "tpu", "gpu") of a mesh's devices."""
  return mesh.devices.flat[0].platform


@contextlib.contextmanager
def building_for(mesh):
  """Within it, `target_platform()`, `target_device_count()` and
  `target_mesh()` describe `mesh`: enter it around the tracing of a
  program built for `mesh`."""
  token = _BUILDING.set(mesh)
  try:
    yield
  finally:
    _BUILDING.reset(token)


def traced_for(mesh, fn):
  """`fn` that traces inside `building_for(mesh)` (wrap before jax.jit)."""
  def traced(*args, **kwargs):
    with building_for(mesh):
      return fn(*args, **kwargs)
  return traced


def target_platform():
  """The platform of the program being built; outside `building_for`, the
  default backend's."""
  building = _BUILDING.get()
  return platform_of(building) if building else jax.default_backend()


def target_device_count():
  """The device count of the program being built (else of this run)."""
  building = _BUILDING.get()
  return building.size if building else jax.device_count()


def target_mesh():
  """The mesh of the program being built, or None outside `building_for`."""
  return _BUILDING.get()


def on_cpu():
  """True if the program being built (else the default backend) is CPU."""
  return target_platform() == "cpu"


# Modules whose presence makes an accelerator JAX's default platform, and
# the device files of that accelerator on a host that has one.
_ACCELERATOR_PLUGINS = (("libtpu", "tpu"), ("jax_cuda13_plugin", "cuda"),
                        ("jax_cuda12_plugin", "cuda"),
                        ("jax_rocm7_plugin", "rocm"))
_DEVICE_FILES = {"tpu": ("/dev/accel*", "/dev/vfio/[0-9]*"),
                 "cuda": ("/dev/nvidia[0-9]*",), "rocm": ("/dev/kfd",)}


def _has_devices(platform):
  return any(glob.glob(pattern) for pattern in _DEVICE_FILES[platform])


def planned_platform():
  """The platform JAX will run on, decided without starting a backend.

  `JAX_PLATFORMS` (or jax_platforms) when set, else the first accelerator
  whose plugin is installed and whose devices this host has (their device
  files), else "cpu". Settings that must precede the first device use
  (plca_jax.main) are chosen with it.
  """
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip()
  for module, platform in _ACCELERATOR_PLUGINS:
    if importlib.util.find_spec(module) is not None and _has_devices(
        platform):
      return platform
  return "cpu"


def select_platform():
  """`planned_platform()`, made JAX's choice when it is "cpu" on a host
  where an accelerator plugin is installed without its devices: JAX would
  otherwise start that plugin first (libtpu prints its start-up warnings
  on every run). Must run before the first device use."""
  platform = planned_platform()
  if platform == "cpu" and not (jax.config.jax_platforms or
                                os.environ.get("JAX_PLATFORMS")):
    jax.config.update("jax_platforms", "cpu")
  return platform


# XLA:GPU's Triton GEMM emitter finds no tiling for some of the bilinear
# resize's products (f32[55480,730] for 19 classes at 730x730: "Couldn't
# find output tile sizes"), so the products go to cuBLAS.
_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

FORM_PREFIX = "plca_form_"
# The forms chosen for XLA:CPU alone: TPU and GPU programs hold none.
CPU_FORMS = ("block_barrier", "dot_weight_grad", "host_sort")


def form(name):
  """A named scope marking one of the forms chosen by platform in a
  program's op names (plca_jax.aot reports them)."""
  return jax.named_scope(FORM_PREFIX + name)


def compiler_options(platform=None):
  """Options for `jax.jit(..., compiler_options=...)` of a program for
  `platform` (default: `target_platform()`)."""
  platform = target_platform() if platform is None else platform
  return dict({"cpu": _CPU_OPTIONS, "gpu": _GPU_OPTIONS}.get(platform, {}))


def use_compilation_cache(setting, workdir):
  """Points JAX's persistent compilation cache at `setting` ("workdir":
  WORKDIR/compilation_cache; "": none), unless a cache is already set
  (JAX_COMPILATION_CACHE_DIR). Returns the cache directory in use, or ""."""
  current = jax.config.jax_compilation_cache_dir
  if current or not setting:
    return current or ""
  path = (os.path.join(str(workdir), "compilation_cache")
          if setting == "workdir" else setting)
  jax.config.update("jax_compilation_cache_dir", path)
  return path


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_host_memory():
  """Makes glibc keep freed memory for reuse instead of unmapping it.

  XLA:CPU allocates each execution's temporary buffer (gigabytes for the
  R101 update) with malloc, which glibc serves from a fresh mmap and
  unmaps on free, so every update page-faults its whole working set in
  again. Three settings make the freed blocks reused:
  - glibc: no mmap for large blocks, no trimming;
  - CPU computations run in the thread that calls them
    (`jax_cpu_enable_async_dispatch=False`), so an update's temporary
    buffer comes from the main thread's arena: on an XLA worker thread,
    whose arena is a chain of 64 MB heaps, glibc maps any larger block
    afresh whatever the mmap settings;
  - the number of arenas stays glibc's (8 per core), so each thread
    allocates small blocks from its own: the convolutions' GEMM (oneDNN
    under Eigen) mallocs packing buffers on every call from every worker
    thread, and one arena for all makes those calls contend for its lock.
  Together they make the R101 update at 321x321 about 1.4x faster on a
  2-core CPU (`benchmarks/step.py --host_memory=keep` against
  `--host_memory=default`); tests/xla_test.py checks that freed blocks
  are reused without page faults.

  Host RSS stays at its peak, which a training process reaches every
  update anyway. Must run before the first use of a device (XLA's threads
  and the CPU client); the glibc part is a no-op where the C library is
  not glibc. Synchronous dispatch on the CPU costs the training loop the
  overlap of its Python work with the update, milliseconds against
  seconds; jax applies it to single-device computations only.

  Returns:
    True if the glibc settings were applied.
  """
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1 as the trim threshold is SIZE_MAX to glibc: never trim.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def set_cpu_devices(total, num_processes=1):
  """Gives each of the run's processes `total / num_processes` CPU devices.

  `config.train.cpu_devices`: on the CPU backend the number of devices is
  a choice (slices of the host's cores), and it decides the SPMD program:
  how the batch is split and in which order gradients and BatchNorm moments
  are summed across it. Fixing the global count makes a run's arithmetic
  independent of how many processes drive it (docs/scaling.md,
  "Reproducibility").
  Overrides `--xla_force_host_platform_device_count`; other backends ignore
  it. Must run before the first device use.

  Args:
    total: global CPU device count; 0 leaves XLA's default (one per process).
    num_processes: processes in the run.

  Raises:
    ValueError: `total` is not a multiple of `num_processes`.
  """
  if not total:
    return
  if total < 0 or total % num_processes:
    raise ValueError(
        f"config.train.cpu_devices={total} must be a positive multiple of "
        f"the number of processes ({num_processes}): each process gets "
        f"cpu_devices / processes CPU devices")
  jax.config.update("jax_num_cpu_devices", total // num_processes)


def check_cpu_devices(total):
  """Raises unless a CPU run has `total` devices (0: any count is fine)."""
  if not total or not on_cpu() or jax.device_count() == total:
    return
  raise ValueError(
      f"config.train.cpu_devices={total}, but this run has "
      f"{jax.device_count()} CPU device(s) ({jax.process_count()} "
      f"process(es) x {jax.local_device_count()}). plca_jax.main sets the "
      f"count before the first device use; a program that calls the "
      f"trainer itself must call plca_jax.xla.set_cpu_devices first (or "
      f"set --config.train.cpu_devices=0 to run on the devices it has)")
