"""Backend-specific XLA settings, in one place.

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
