"""Tests of plca_jax.models.norm against flax's BatchNorm and NumPy."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax.models import norm


def _numpy_batch_norm(x, scale, bias, eps):
  """Plain float64 train-mode BatchNorm over all axes but the last."""
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axis=axes)
  var = ((x - mean) ** 2).mean(axis=axes)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


class BatchNormTest(parameterized.TestCase):

  def test_values_and_gradients_match_numpy_float64(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5)) * 3 + 1
    scale, bias = rng.normal(size=5), rng.normal(size=5)
    w = rng.normal(size=x.shape)  # a generic cotangent
    with jax.enable_x64(True):
      y, mean, var = norm.batch_norm_train(jnp.asarray(x), jnp.asarray(scale),
                                           jnp.asarray(bias), 1e-5)
      loss = lambda a, s, b: jnp.sum(  # pylint: disable=g-long-lambda
          jnp.asarray(w) * norm.batch_norm_train(a, s, b, 1e-5)[0])
      grads = jax.grad(loss, argnums=(0, 1, 2))(
          jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    y_ref, mean_ref, var_ref = _numpy_batch_norm(x, scale, bias, 1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    ref = lambda a, s, b: np.sum(w * _numpy_batch_norm(a, s, b, 1e-5)[0])
    for k, arg in enumerate((x, scale, bias)):
      args = [x, scale, bias]
      numeric = np.zeros_like(arg)
      for idx in np.ndindex(arg.shape):
        up, down = [a.copy() for a in args], [a.copy() for a in args]
        up[k][idx] += 1e-6
        down[k][idx] -= 1e-6
        numeric[idx] = (ref(*up) - ref(*down)) / 2e-6
      np.testing.assert_allclose(grads[k], numeric, rtol=1e-5, atol=1e-7)

  @parameterized.parameters(True, False)
  def test_same_variables_values_and_running_stats_as_flax(self, train):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 8)) * 2 + 0.5, jnp.float32)
    ours = norm.BatchNorm(use_running_average=not train, momentum=0.9)
    flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                           epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), x)
    self.assertEqual(
        jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)),
        jax.tree.map(jnp.shape, variables))
    variables = {"params": {"scale": jnp.asarray(rng.normal(size=8) + 1,
                                                 jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=8),
                                                jnp.float32)},
                 "batch_stats": {"mean": jnp.full((8,), 0.3, jnp.float32),
                                 "var": jnp.full((8,), 2.0, jnp.float32)}}
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(module):
      def loss(params, x):
        y, updates = module.apply({**variables, "params": params}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(w * y), (y, updates)
      return jax.grad(loss, argnums=(0, 1), has_aux=True)(
          variables["params"], x)

    (g_ours, (y_ours, up_ours)), (g_flax, (y_flax, up_flax)) = (
        run(ours), run(flax_bn))
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves((g_ours, up_ours)),
                    jax.tree.leaves((g_flax, up_flax))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def test_bfloat16_keeps_only_bfloat16_input_for_backward(self):
    x = jnp.ones((2, 8, 8, 16), jnp.bfloat16)
    residuals = jax.eval_shape(
        lambda a: jax.vjp(lambda b: norm.batch_norm_train(
            b, jnp.ones(16), jnp.zeros(16), 1e-5)[0], a)[1], x)
    big = [r for r in jax.tree.leaves(residuals) if r.size >= x.size]
    self.assertLen(big, 1)
    self.assertEqual(big[0].dtype, jnp.bfloat16)


if __name__ == "__main__":
  absltest.main()
