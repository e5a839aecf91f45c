"""Tests of plca_jax.models.norm against flax's BatchNorm and NumPy."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax.models import norm


def _numpy_batch_norm(x, scale, bias, eps, groups=1):
  """Plain float64 train-mode BatchNorm over all axes but the last; with
  groups, rows n % groups == g normalised together, group by group."""
  y = np.empty_like(x)
  means, variances = [], []
  for g in range(groups):
    part = x[g::groups]
    axes = tuple(range(x.ndim - 1))
    mean = part.mean(axis=axes)
    var = ((part - mean) ** 2).mean(axis=axes)
    y[g::groups] = (part - mean) / np.sqrt(var + eps) * scale + bias
    means.append(mean)
    variances.append(var)
  return y, np.stack(means), np.stack(variances)


class BatchNormTest(parameterized.TestCase):

  @parameterized.parameters(1, 2)
  def test_values_and_gradients_match_numpy_float64(self, groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * groups, 3, 4, 5)) * 3 + 1
    x[1::groups] = x[1::groups] * 0.5 - 2  # the groups differ
    scale, bias = rng.normal(size=5), rng.normal(size=5)
    w = rng.normal(size=x.shape)  # a generic cotangent
    with jax.enable_x64(True):
      y, mean, var = norm.batch_norm_train(jnp.asarray(x), jnp.asarray(scale),
                                           jnp.asarray(bias), 1e-5, groups)
      loss = lambda a, s, b: jnp.sum(  # pylint: disable=g-long-lambda
          jnp.asarray(w) * norm.batch_norm_train(a, s, b, 1e-5, groups)[0])
      grads = jax.grad(loss, argnums=(0, 1, 2))(
          jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    y_ref, mean_ref, var_ref = _numpy_batch_norm(x, scale, bias, 1e-5, groups)
    self.assertEqual(mean.shape, (groups, 5))
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(var, var_ref, rtol=1e-12)
    ref = lambda a, s, b: np.sum(  # pylint: disable=g-long-lambda
        w * _numpy_batch_norm(a, s, b, 1e-5, groups)[0])
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

  def test_groups_equal_separate_passes_in_order(self):
    # Rows 0, 2 (group 0) and 1, 3 (group 1) normalised together equal a
    # pass over group 0 followed by a pass over group 1: outputs, parameter
    # gradients and running statistics.
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.normal(size=(2, 5, 5, 6)) * 2 + 1, jnp.float32)
    b = jnp.asarray(rng.normal(size=(2, 5, 5, 6)) * 0.5 - 1, jnp.float32)
    both = jnp.stack([a, b], axis=1).reshape(4, 5, 5, 6)
    w = jnp.asarray(rng.normal(size=both.shape), jnp.float32)
    wa, wb = w.reshape(2, 2, 5, 5, 6)[:, 0], w.reshape(2, 2, 5, 5, 6)[:, 1]
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 6),
                            "bias": jnp.linspace(-1, 1, 6)},
                 "batch_stats": {"mean": jnp.full((6,), 0.3),
                                 "var": jnp.full((6,), 2.0)}}

    def one_pass(params):
      y, up = norm.BatchNorm(momentum=0.9, groups=2).apply(
          {**variables, "params": params}, both, mutable=["batch_stats"])
      return jnp.sum(w * y), (y, up["batch_stats"])

    def two_passes(params):
      module = norm.BatchNorm(momentum=0.9)
      ya, up = module.apply({**variables, "params": params}, a,
                            mutable=["batch_stats"])
      yb, up = module.apply({"params": params, **up}, b,
                            mutable=["batch_stats"])
      return (jnp.sum(wa * ya) + jnp.sum(wb * yb),
              (jnp.stack([ya, yb], axis=1).reshape(both.shape),
               up["batch_stats"]))

    got = jax.grad(one_pass, has_aux=True)(variables["params"])
    want = jax.grad(two_passes, has_aux=True)(variables["params"])
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)
    # Order matters for the running statistics: group 1 is the later pass.
    swapped = 0.9 * (0.9 * 0.3 + 0.1 * jnp.mean(b, axis=(0, 1, 2))) + (
        0.1 * jnp.mean(a, axis=(0, 1, 2)))
    self.assertGreater(
        float(jnp.max(jnp.abs(got[1][1]["mean"] - swapped))), 1e-3)
    with self.assertRaisesRegex(ValueError, "batch 3 is not a multiple of 2"):
      norm.batch_norm_train(both[:3], jnp.ones(6), jnp.zeros(6), 1e-5, 2)

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
