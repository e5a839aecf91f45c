"""A bias-free 2-D convolution whose weight gradient is a sum of matrix
products, for XLA:CPU.

`jax.lax.conv_general_dilated`'s weight gradient is itself a convolution
(the "batch" the input channels, the window the whole output gradient),
which XLA:CPU runs in its Eigen convolution kernel 1.2-2x slower than a
matrix product of the same arithmetic (docs/performance.md). Here the
weight gradient is written per kernel tap (i, j) as one product,
    dW[i, j] = X_ij^T G,
X_ij the (N*H'*W', C_in) input pixels that tap reads (a strided, dilated
window of the padded input) and G the (N*H'*W', C_out) output gradient: the
same sums as the convolution, as k*k dots that XLA:CPU hands to its matrix
kernels. The forward pass and the input gradient are
`lax.conv_general_dilated` and its transpose, except for stride-1 1x1
kernels, whose forward pass X W and input gradient G W^T are matrix products
too: XLA:CPU's matrix kernels ran the bottlenecks' 1x1 convolutions 1.1-1.3x
faster than its convolution, and six layer3 blocks' forward + backward
0.95x the time (benchmarks/step.py --cpu_kernels=both for the update).

Used on the CPU backend only (`plca_jax.models.get_model`): on GPU and TPU
the weight gradient convolution is native (cuDNN, the TPU's MXU).
`Conv` has the variables of `flax.linen.Conv` (one "kernel" (kh, kw, C_in,
C_out)), so checkpoints and converted weights do not depend on it.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from plca_jax import xla

_DIMS = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, strides, padding, dilation):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, rhs_dilation=dilation,
      dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_dot_weight_grad(x, kernel, strides, padding, dilation):
  """`lax.conv_general_dilated` (NHWC, HWIO) whose weight gradient is k*k
  matrix products.

  Args:
    x: (N, H, W, C_in).
    kernel: (kh, kw, C_in, C_out), x's dtype.
    strides, dilation: (sh, sw), (dh, dw) of the kernel.
    padding: ((top, bottom), (left, right)).

  Returns:
    (N, H', W', C_out), the same as `lax.conv_general_dilated`.
  """
  return _forward(x, kernel, strides, padding, dilation)


def _pointwise(kernel, strides, padding):
  """True for a 1x1 kernel with stride 1 and no padding: a matrix product
  over the pixels."""
  return (kernel.shape[:2] == (1, 1) and tuple(strides) == (1, 1) and
          all(p == 0 for pair in padding for p in pair))


def _matmul(a, b):
  """(..., K) x (K, M) in a's dtype, accumulated in float32 at least."""
  acc = jnp.promote_types(a.dtype, jnp.float32)
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=acc).astype(a.dtype)


def _forward(x, kernel, strides, padding, dilation):
  if _pointwise(kernel, strides, padding):
    return _matmul(x, kernel[0, 0])
  return _lax_conv(x, kernel, strides, padding, dilation)


def _fwd(x, kernel, strides, padding, dilation):
  return _forward(x, kernel, strides, padding, dilation), (x, kernel)


def _bwd(strides, padding, dilation, res, g):
  x, kernel = res
  # The transpose of the forward's product or convolution: G W^T for a
  # pointwise kernel, the transposed convolution otherwise.
  _, input_vjp = jax.vjp(
      lambda x: _forward(x, kernel, strides, padding, dilation), x)
  (dx,) = input_vjp(g)
  with xla.form("dot_weight_grad"):
    dw = weight_grad(x, g, kernel.shape, strides, padding, dilation)
  return dx, dw


conv_dot_weight_grad.defvjp(_fwd, _bwd)


# Up to this many kernel-window values per output pixel (kh * kw * C_in) the
# weight gradient is one product over the im2col patches, not one per tap:
# the stem's 7x7x3 (147) as 49 products with an inner size of 3 took 2.5x
# as long as one with 147 (measured at 321x321).
PATCHES_MAX = 1024


def weight_grad(x, g, kernel_shape, strides, padding, dilation):
  """d(sum g * conv(x, W)) / dW as matrix products.

  One product per kernel tap, dW[i, j] = X_ij^T G; for a small window
  (kh * kw * C_in <= PATCHES_MAX, e.g. the stem's 7x7x3) one product of the
  taps' windows side by side (im2col) with G.

  Args:
    x: (N, H, W, C_in) input; g: (N, H', W', C_out) output gradient.
    kernel_shape: (kh, kw, C_in, C_out).
    strides, padding, dilation: the convolution's (see
      `conv_dot_weight_grad`).

  Returns:
    (kh, kw, C_in, C_out) in the kernel's dtype (x's); the products
    accumulate in float32 at least.
  """
  kh, kw, c_in, c_out = kernel_shape
  _, out_h, out_w, _ = g.shape
  # A negative padding crops; lax.pad takes both signs.
  zero = jnp.zeros((), x.dtype)
  xp = jax.lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                             (0, 0, 0)))
  g2 = g.reshape(-1, c_out)
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def product(a):  # a^T g2, a (P, K)
    return jax.lax.dot_general(a, g2, (((0,), (0,)), ((), ())),
                               preferred_element_type=acc)

  windows = []
  for i in range(kh):
    for j in range(kw):
      top, left = i * dilation[0], j * dilation[1]
      windows.append(jax.lax.slice(
          xp, (0, top, left, 0),
          (xp.shape[0], top + strides[0] * (out_h - 1) + 1,
           left + strides[1] * (out_w - 1) + 1, c_in),
          (1, strides[0], strides[1], 1)).reshape(-1, c_in))
  if kh * kw * c_in <= PATCHES_MAX:
    dw = product(jnp.concatenate(windows, axis=1))
  else:
    dw = jnp.stack([product(w) for w in windows])
  return dw.reshape(kernel_shape).astype(x.dtype)


class Conv(nn.Module):
  """Bias-free `nn.Conv` (NHWC) with `conv_dot_weight_grad`'s gradient.

  Attributes mirror `flax.linen.Conv`'s: `features`, `kernel_size`,
  `strides`, `padding` (explicit ((top, bottom), (left, right))),
  `kernel_dilation`, `dtype` (computation), `kernel_init`. The kernel
  parameter is float32 and named "kernel", as flax's.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((0, 0), (0, 0))
  kernel_dilation: Sequence[int] = (1, 1)
  dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = tuple(tuple(p) for p in self.padding)
    return conv_dot_weight_grad(x, kernel, tuple(self.strides), padding,
                                tuple(self.kernel_dilation))
