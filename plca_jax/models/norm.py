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

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x, scale, bias, epsilon, groups=1):
  """Normalises x (N, ..., C) with its own batch statistics over all but C.

  With `groups` G > 1 the batch holds G interleaved groups (row n belongs to
  group n % G) and each group is normalised with its own statistics, as if
  it went through alone: what one pass over source and target stacked
  image by image needs for per-domain BatchNorm.

  Returns (y in x's dtype, mean (G, C), biased var (G, C)); mean and var
  carry no gradient (they feed the running averages only).
  """
  return _forward(x, scale, bias, epsilon, groups)[0]


def _view(x, groups):
  """x and the axes its statistics reduce over: for G > 1 x as (N/G, G,
  ..., C), all axes but 1 and the last; for G = 1 x itself, all but the
  last."""
  if groups == 1:
    return x, tuple(range(x.ndim - 1))
  if x.shape[0] % groups:
    raise ValueError(f"BatchNorm groups: batch {x.shape[0]} is not a "
                     f"multiple of {groups}")
  xg = x.reshape(x.shape[0] // groups, groups, *x.shape[1:])
  return xg, (0, *range(2, xg.ndim - 1))


def _forward(x, scale, bias, epsilon, groups):
  xg, axes = _view(x, groups)
  xf = _f32(xg)
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((xf - mean) * (inv * scale) + bias).reshape(x.shape)
  stats = (mean.reshape(groups, -1), var.reshape(groups, -1))
  return (y.astype(x.dtype), *stats), (x, mean, inv, scale)


def _bwd(groups, res, cotangents):
  x, mean, inv, scale = res
  xg, axes = _view(x, groups)
  dy = _f32(cotangents[0]).reshape(xg.shape)  # statistics' cotangents unused
  count = x.size // (groups * x.shape[-1])
  x_hat = (_f32(xg) - mean) * inv
  dbias = jnp.sum(dy, axis=axes, keepdims=True)
  dscale = jnp.sum(dy * x_hat, axis=axes, keepdims=True)
  dx = (scale * inv / count) * (count * dy - dbias - x_hat * dscale)
  return (dx.reshape(x.shape).astype(x.dtype),
          jnp.sum(dscale.reshape(groups, -1), axis=0),
          jnp.sum(dbias.reshape(groups, -1), axis=0), None)


batch_norm_train.defvjp(_forward, _bwd)


class BatchNorm(nn.Module):
  """Drop-in for `nn.BatchNorm` over the last axis (see module docstring).

  Attributes:
    use_running_average: eval mode (running statistics) if True.
    momentum: running average decay (0.9 = PyTorch's momentum 0.1).
    epsilon: added to the variance.
    dtype: output dtype (None: the input's).
    groups: G > 1: the batch holds G interleaved groups (row n in group
      n % G), each normalised with its own statistics; the running
      statistics take the groups' in order 0, 1, ..., as G separate
      passes would (`methods.base.forward_pair`).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  groups: int = 1

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
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon,
                                    self.groups)
    if not self.is_initializing():
      mean, var = jax.lax.stop_gradient((mean, var))
      m = self.momentum
      for g in range(self.groups):
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean[g]
        ra_var.value = m * ra_var.value + (1.0 - m) * var[g]
    return y
