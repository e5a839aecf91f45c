"""plca_jax.losses.contrastive against a plain NumPy float64 loop."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax.losses import contrastive
from tests import reference


def _plain(f, g, y, tau, ignore=255):
  """The formula as written (no closed form), one image pair at a time."""
  total, count = 0.0, 0
  for fi, gi, yi in zip(f, g, y):
    fi = fi.reshape(-1, fi.shape[-1])
    gi = gi.reshape(-1, gi.shape[-1])
    yi = yi.reshape(-1)
    fi = fi / np.maximum(np.linalg.norm(fi, axis=1, keepdims=True), 1e-12)
    gi = gi / np.maximum(np.linalg.norm(gi, axis=1, keepdims=True), 1e-12)
    keep = yi != ignore
    for p in range(len(fi)):
      if yi[p] == ignore:
        continue
      positives = [q for q in range(len(gi)) if keep[q] and yi[q] == yi[p]]
      if not positives:
        continue
      logits = np.array([fi[p] @ gi[k] / tau for k in range(len(gi))
                         if keep[k]])
      log_denominator = np.log(np.sum(np.exp(logits)))
      total += -np.mean([fi[p] @ gi[q] / tau - log_denominator
                         for q in positives])
      count += 1
  return total / max(count, 1)


def _inputs(seed, n=2, h=3, w=4, c=5, classes=3, ignore_frac=0.25):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(n, h, w, c))
  g = f + 0.5 * rng.normal(size=(n, h, w, c))  # a related "translation"
  y = rng.integers(0, classes, (n, h, w))
  y[rng.random(y.shape) < ignore_frac] = 255
  return f, g, y


class PixelContrastTest(parameterized.TestCase):

  @parameterized.parameters((None, 0.1), (5, 0.5))
  def test_value_and_gradients_match_the_plain_loop(self, chunk_size, tau):
    f, g, y = _inputs(0)
    with jax.enable_x64(True):
      fn = functools.partial(contrastive.pixel_contrast_loss, num_classes=3,
                             tau=tau, chunk_size=chunk_size)
      value, (gf, gg) = jax.value_and_grad(
          lambda a, b: fn(a, b, jnp.asarray(y)), argnums=(0, 1))(
              jnp.asarray(f), jnp.asarray(g))
    expected = _plain(f, g, y, tau)
    self.assertGreater(expected, 0.0)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(gf, reference.numeric_grad(
        lambda a: _plain(a, g, y, tau), f), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gg, reference.numeric_grad(
        lambda b: _plain(f, b, y, tau), g), rtol=1e-5, atol=1e-8)

  def test_float32_chunked_equals_unchunked(self):
    f, g, y = _inputs(1, h=6, w=7, c=8, classes=4)
    args = (jnp.asarray(f, jnp.float32), jnp.asarray(g, jnp.float32),
            jnp.asarray(y))
    whole = contrastive.pixel_contrast_loss(*args, num_classes=4)
    chunked = contrastive.pixel_contrast_loss(*args, num_classes=4,
                                              chunk_size=8)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(whole, _plain(f, g, y, 0.1), rtol=1e-5)

  def test_all_ignored_gives_zero_and_zero_gradient(self):
    f, g, y = _inputs(2)
    y[:] = 255
    value, grads = jax.value_and_grad(
        lambda a, b: contrastive.pixel_contrast_loss(
            a, b, jnp.asarray(y), num_classes=3, chunk_size=4),
        argnums=(0, 1))(jnp.asarray(f, jnp.float32),
                        jnp.asarray(g, jnp.float32))
    self.assertEqual(float(value), 0.0)
    for grad in grads:
      self.assertTrue(np.all(np.asarray(grad) == 0.0))


if __name__ == "__main__":
  absltest.main()
