"""Backend-specific XLA settings, and the host allocator, in one place.

XLA:CPU needs two changes to run the ResNet backward near PyTorch's speed
(measured: ../shared/STACK.md, README "Performance"); neither applies to
GPU or TPU, where XLA uses cuDNN / emits convolution gradients natively:
- convolutions go to XLA's own (Eigen) kernels instead of YNNPACK, whose
  weight-gradient convolutions (a window over the whole output gradient)
  were 1.5-6x slower;
- `lax.optimization_barrier` survives to the fusion passes (XLA:CPU's
  `cse_barrier_expander` removes it first), so the block outputs the model
  materialises (`ResNet.block_barrier`) stay materialised.
"""

import ctypes
import ctypes.util
import sys

import jax

_CPU_OPTIONS = {
    # Dots and reductions stay with YNNPACK; convolutions leave it.
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander",
}


def on_cpu():
  """True if the default backend is the CPU."""
  return jax.default_backend() == "cpu"


def compiler_options():
  """Options for `jax.jit(..., compiler_options=...)` on this backend."""
  return dict(_CPU_OPTIONS) if on_cpu() else {}


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory():
  """Makes glibc keep freed memory for reuse instead of unmapping it.

  XLA:CPU allocates each execution's temporary buffer (2.9 GB for the R101
  update at 321x321) with malloc, which glibc serves from a fresh mmap and
  unmaps on free, so every update page-faults its whole working set in
  again: measured 790k minor faults and 2.1 s of system CPU time per
  update. With one arena, no mmap for large blocks and no trimming, the
  freed blocks are reused: 0 faults from the second update on, 0.13 s of
  system time. Host RSS then stays at its peak, which a training process
  reaches every update anyway. Must run before XLA starts its threads (the
  first use of a device); a no-op where the C library is not glibc.

  Returns:
    True if the settings were applied.
  """
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
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
