"""BatchNorm whose backward pass keeps only its input (in its own dtype).

Same variables as `flax.linen.BatchNorm` ("params": scale, bias;
"batch_stats": mean, var; momentum and epsilon with the same meaning, the
running variance updated with the biased batch variance), so checkpoints and
converted weights are interchangeable. The difference is what the forward
pass keeps for the backward pass: flax normalises in float32 and autodiff
keeps float32 intermediates of the size of the input (x - mean, x * x),
which made a bfloat16 network keep 0.78x of the float32 activations. Here
the train-mode normalisation is one custom VJP that keeps the input x in
its own dtype plus per-channel statistics, and recomputes x_hat in the
backward pass:
    dbias = sum dy, dscale = sum dy x_hat,
    dx = scale inv_std / M (M dy - dbias - x_hat dscale),
M the number of values per channel. Statistics and gradients are computed
in float32 (float64 for float64 input).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@jax.custom_vjp
def batch_norm_train(x, scale, bias, epsilon):
  """Normalises x (..., C) with its own batch statistics over all but C.

  Returns (y in x's dtype, mean (C,), biased var (C,)); mean and var carry no
  gradient (they feed the running averages only).
  """
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  xf = _f32(x)
  mean = jnp.mean(xf, axis=axes)
  var = jnp.mean(jnp.square(xf - mean), axis=axes)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * (inv * scale) + bias
  return (y.astype(x.dtype), mean, var), (x, mean, inv, scale)


def _bwd(res, cotangents):
  x, mean, inv, scale = res
  dy = _f32(cotangents[0])  # the statistics' cotangents are not used
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (_f32(x) - mean) * inv
  dbias = jnp.sum(dy, axis=axes)
  dscale = jnp.sum(dy * x_hat, axis=axes)
  dx = (scale * inv / count) * (count * dy - dbias - x_hat * dscale)
  return dx.astype(x.dtype), dscale, dbias, None


batch_norm_train.defvjp(_forward, _bwd)


class BatchNorm(nn.Module):
  """Drop-in for `nn.BatchNorm` over the last axis (see module docstring).

  Attributes:
    use_running_average: eval mode (running statistics) if True.
    momentum: running average decay (0.9 = PyTorch's momentum 0.1).
    epsilon: added to the variance.
    dtype: output dtype (None: the input's).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,),
                       jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,),
                      jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,),
                            jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,),
                           jnp.float32)
    dtype = x.dtype if self.dtype is None else self.dtype
    x = x.astype(dtype)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = (_f32(x) - ra_mean.value) * (inv * scale) + bias
      return y.astype(dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient((mean, var))
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
      ra_var.value = m * ra_var.value + (1.0 - m) * var
    return y
