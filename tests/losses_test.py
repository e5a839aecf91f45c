"""Tests of plca_jax.losses against the NumPy float64 reference."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plca_jax import losses
from plca_jax.losses import cos_cycle
from plca_jax.losses import similarity
from tests import reference


def _random_inputs(seed, metric, n=2, hs=3, ws=4, ht=3, wt=3, c=5,
                   num_classes=3, ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(n, hs, ws, c))
  t = rng.normal(size=(n, ht, wt, c))
  if metric == "kl":
    s, t = reference.softmax(2 * s), reference.softmax(2 * t)
  y = rng.integers(0, num_classes, size=(n, hs, ws))
  y[rng.random(y.shape) < ignore_frac] = 255
  return s, t, y


class AssociationTest(parameterized.TestCase):

  @parameterized.product(metric=["cos", "kl"], aggregate=[True, False],
                         chunk_size=[None, 5])
  def test_value_and_gradients_match_reference(self, metric, aggregate,
                                               chunk_size):
    s, t, y = _random_inputs(0, metric)
    with jax.enable_x64(True):
      fn = functools.partial(losses.association_loss, metric=metric,
                             aggregate_target=aggregate,
                             chunk_size=chunk_size)
      value, (gs, gt) = jax.value_and_grad(
          lambda a, b: fn(a, b, jnp.asarray(y)), argnums=(0, 1))(
              jnp.asarray(s), jnp.asarray(t))
    ref = lambda a, b: reference.cycle(a, b, y, metric, aggregate,
                                       frozen=(s, t))[0]
    expected = ref(s, t)
    self.assertGreater(expected, 0.0)  # some cycle is consistent
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    np.testing.assert_allclose(gs, reference.numeric_grad(
        lambda a: ref(a, t), s), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gt, reference.numeric_grad(
        lambda b: ref(s, b), t), rtol=1e-5, atol=1e-8)

  @parameterized.parameters("cos", "kl")
  def test_selection_matches_reference(self, metric):
    s, t, y = _random_inputs(1, metric, hs=4, ws=5, ht=4, wt=4)
    with jax.enable_x64(True):
      out = losses.cycle_association(jnp.asarray(s), jnp.asarray(t),
                                     jnp.asarray(y), metric)
    _, details = reference.cycle(s, t, y, metric)
    for key in ("j_star", "i_star", "selected"):
      np.testing.assert_array_equal(out[key], np.stack(details[key]), key)
    # Ignored source pixels are never selected.
    self.assertFalse(np.any(np.asarray(out["selected"])[y.reshape(2, -1) ==
                                                        255]))

  @parameterized.parameters("cos", "kl")
  def test_sim_plca_matches_reference(self, metric):
    s, t, y = _random_inputs(2, metric)
    with jax.enable_x64(True):
      fn = lambda a, b: losses.cycle_association(
          a, b, jnp.asarray(y), metric, sim_plca=True,
          chunk_size=4)["mean_loss"]
      value, gs = jax.value_and_grad(fn)(jnp.asarray(s), jnp.asarray(t))
    ref = lambda a: reference.cycle(a, t, y, metric, frozen=(s, t),
                                    sim_plca=True)[0]
    np.testing.assert_allclose(value, ref(s), rtol=1e-10)
    np.testing.assert_allclose(gs, reference.numeric_grad(ref, s), rtol=1e-5,
                               atol=1e-8)

  def test_no_consistent_cycle_gives_zero_loss_and_zero_gradient(self):
    # Both target pixels point back to source pixel 0, which is ignored, so
    # no valid source pixel can close a consistent cycle.
    s = np.zeros((1, 2, 3, 4), np.float32)
    s[0, 0, 0] = [1, 0, 0, 0]
    s[0, 0, 1:] = [[0.1, 1, 0, 0], [0.1, 0, 1, 0]]
    s[0, 1] = [[0.1, 0, 0, 1], [0.2, 1, 1, 0], [0.1, 0, 1, 1]]
    t = np.array([[[[1, 0.01, 0, 0], [1, 0, 0.02, 0]]]], np.float32)
    y = np.array([[[255, 0, 1], [0, 1, 2]]])
    for metric in ("cos", "kl"):
      a, b = (s, t) if metric == "cos" else (
          reference.softmax(5 * s), reference.softmax(5 * t))
      out = losses.cycle_association(a, b, y, metric)
      self.assertFalse(np.any(out["selected"]))
      self.assertTrue(np.all(out["i_star"] == 0))
      value, grads = jax.value_and_grad(
          lambda u, v: losses.association_loss(u, v, y, metric),
          argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b))
      self.assertEqual(float(value), 0.0)
      for g in grads:
        self.assertTrue(np.all(np.isfinite(g)))
        np.testing.assert_array_equal(g, 0.0)

  def test_all_ignored_gives_zero(self):
    s, t, _ = _random_inputs(3, "cos")
    y = np.full(s.shape[:3], 255)
    value, g = jax.value_and_grad(losses.association_loss)(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), y)
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(g, 0.0)

  @parameterized.parameters("cos", "kl")
  def test_ties_take_the_first_index(self, metric):
    rng = np.random.default_rng(4)
    c = 4
    t = rng.normal(size=(1, 3, 3, c))
    t[0, 2, 1] = t[0, 0, 2]  # target pixels 2 and 7 are identical
    s = rng.normal(size=(1, 2, 3, c))
    s[0, 0, 0] = t[0, 0, 2]  # source pixel 0 matches both equally
    if metric == "kl":
      s, t = reference.softmax(3 * s), reference.softmax(3 * t)
    y = np.zeros((1, 2, 3), np.int32)
    with jax.enable_x64(True):
      out = losses.cycle_association(jnp.asarray(s), jnp.asarray(t), y,
                                     metric, aggregate_target=False)
    self.assertEqual(int(out["j_star"][0, 0]), 2)
    _, details = reference.cycle(s, t, y, metric, aggregate_target=False)
    np.testing.assert_array_equal(out["j_star"][0], details["j_star"][0])
    # Value and gradient at the tie (the choices frozen, as in autodiff).
    with jax.enable_x64(True):
      value, gs = jax.value_and_grad(
          lambda a: losses.association_loss(a, jnp.asarray(t), y, metric,
                                            aggregate_target=False,
                                            chunk_size=4))(jnp.asarray(s))
    ref = lambda a: reference.cycle(a, t, y, metric, aggregate_target=False,
                                    frozen=(s, t))[0]
    np.testing.assert_allclose(value, ref(s), rtol=1e-10)
    # rtol 1e-4: for `kl` some probabilities are ~1e-3 and the central
    # difference of log(p) with step 1e-6 is off by ~5e-5 relative.
    np.testing.assert_allclose(gs, reference.numeric_grad(ref, s),
                               rtol=1e-4, atol=1e-8)

  @parameterized.product(metric=["cos", "kl"], chunk_size=[None, 4])
  def test_back_association_ties_take_the_first_source_pixel(
      self, metric, chunk_size):
    # Source pixels 1 and 6 are identical (in different chunks of 4), so
    # every D_ts row ties between them: i* must be 1, the first, as in the
    # release's torch.max.
    rng = np.random.default_rng(9)
    s = rng.normal(size=(1, 2, 4, 5))
    s[0, 1, 2] = s[0, 0, 1]
    t = rng.normal(size=(1, 3, 3, 5))
    if metric == "kl":
      s, t = reference.softmax(3 * s), reference.softmax(3 * t)
    y = np.zeros((1, 2, 4), np.int32)
    with jax.enable_x64(True):
      out = losses.cycle_association(jnp.asarray(s), jnp.asarray(t), y,
                                     metric, aggregate_target=False,
                                     chunk_size=chunk_size)
    _, details = reference.cycle(s, t, y, metric, aggregate_target=False)
    np.testing.assert_array_equal(out["i_star"][0], details["i_star"][0])
    self.assertNotIn(6, np.asarray(out["i_star"][0]).tolist())

  def test_cos_column_statistics_float32_match_float64(self):
    # The closed-form column mean / std of D_st (the D_ts rows' detached
    # statistics), from float32 non-negative features like ReLU outputs,
    # whose cosines are all positive: the case where a second moment minus
    # a squared mean would cancel.
    rng = np.random.default_rng(10)
    s = np.maximum(rng.normal(size=(700, 64)), 0.0) + 0.05
    t = np.maximum(rng.normal(size=(300, 64)), 0.0) + 0.05
    d = reference.similarity(s, t, "cos")  # float64, (Ls, Lt)
    s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    rs = jax.lax.rsqrt(jnp.sum(s32 * s32, -1))
    rt = jax.lax.rsqrt(jnp.sum(t32 * t32, -1))
    mean, scale = cos_cycle.column_stats(s32, rs, t32, rt, 256)
    np.testing.assert_allclose(mean, d.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(scale, d.std(axis=0, ddof=1) + 1e-10,
                               rtol=1e-4)

  @parameterized.parameters("cos", "kl")
  def test_single_class_selects_every_valid_pixel(self, metric):
    s, t, _ = _random_inputs(5, metric)
    y = np.full(s.shape[:3], 2)
    with jax.enable_x64(True):
      out = losses.cycle_association(jnp.asarray(s), jnp.asarray(t), y,
                                     metric)
      value = losses.association_loss(jnp.asarray(s), jnp.asarray(t), y,
                                      metric)
    np.testing.assert_array_equal(out["selected"], True)
    np.testing.assert_allclose(value, reference.cycle(s, t, y, metric)[0],
                               rtol=1e-10)

  @parameterized.product(metric=["cos", "kl"], chunk_size=[1, 3, 7, 12, 64])
  def test_chunked_equals_unchunked(self, metric, chunk_size):
    s, t, y = _random_inputs(6, metric, hs=3, ws=4, ht=4, wt=4, c=8)
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    fn = lambda a, b, cs: losses.association_loss(a, b, y, metric,
                                                  chunk_size=cs)
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    v0, g0 = grad(s, t, None)
    v1, g1 = jax.jit(grad, static_argnums=2)(s, t, chunk_size)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(g1, g0):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  @parameterized.parameters("cos", "kl")
  @pytest.mark.slow
  def test_batch_equals_images_one_by_one(self, metric):
    # A batch of 2 runs vmapped; one image runs without the batch axis.
    s, t, y = _random_inputs(7, metric, hs=3, ws=4, ht=4, wt=4, c=6)
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)

    def sums(a, b, labels):  # per-image sums: the batch mean is a ratio
      out = losses.cycle_association(a, b, labels, metric, chunk_size=5)
      return (jnp.sum(jnp.where(out["selected"], out["loss"], 0.0)),
              out["j_star"], out["i_star"], out["selected"])

    whole = sums(s, t, y)
    parts = [sums(s[k:k + 1], t[k:k + 1], y[k:k + 1]) for k in range(2)]
    np.testing.assert_allclose(whole[0], parts[0][0] + parts[1][0],
                               rtol=1e-6)
    for key in (1, 2, 3):
      np.testing.assert_array_equal(
          whole[key], np.concatenate([p[key] for p in parts]))
    fn = lambda a, b: losses.association_loss(a, b, y[:1], metric,
                                              chunk_size=5)
    g_one = jax.grad(fn, argnums=(0, 1))(s[:1], t[:1])
    g_two = jax.grad(lambda a, b: fn(a[:1], b[:1]), argnums=(0, 1))(s, t)
    for a, b in zip(g_one, g_two):
      np.testing.assert_allclose(b[:1], a, rtol=1e-6, atol=1e-8)

  @parameterized.parameters("cos", "kl")
  def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32(
      self, metric):
    s, t, y = _random_inputs(8, metric, hs=4, ws=4, ht=4, wt=4, c=8,
                             num_classes=2, ignore_frac=0.0)
    fn = lambda a, b: losses.association_loss(a, b, y, metric, chunk_size=6)
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    s16, t16 = (jnp.asarray(v, jnp.bfloat16) for v in (s, t))
    v16, g16 = grad(s16, t16)
    v32, g32 = grad(s16.astype(jnp.float32), t16.astype(jnp.float32))
    self.assertEqual(v16.dtype, jnp.float32)
    np.testing.assert_allclose(v16, v32, rtol=1e-6)
    for a, b in zip(g16, g32):
      self.assertEqual(a.dtype, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                                 atol=1e-3 * float(jnp.max(jnp.abs(b))))

  def test_bce_gradient_is_zero_at_one_and_log_clamped(self):
    g = jax.grad(similarity.bce_positive)
    self.assertEqual(float(g(1.0)), 0.0)
    np.testing.assert_allclose(g(0.25), -4.0, rtol=1e-6)
    self.assertEqual(float(similarity.bce_positive(0.0)), 100.0)
    self.assertTrue(np.isfinite(g(0.0)))

  def test_cosine_normalisation_gradient_is_finite_at_zero(self):
    x = jnp.zeros((1, 2, 2, 3)).at[0, 0, 0].set(jnp.array([1.0, 2.0, 0.5]))
    g = jax.grad(lambda v: jnp.sum(losses.spatial_aggregate(v, "cos")**2))(x)
    self.assertTrue(np.all(np.isfinite(g)))

  def test_bad_metric_and_shapes_raise(self):
    s = jnp.zeros((1, 2, 2, 3))
    with self.assertRaisesRegex(ValueError, "metric='l2'"):
      losses.association_loss(s, s, jnp.zeros((1, 2, 2), jnp.int32), "l2")
    with self.assertRaisesRegex(ValueError, "source grid"):
      losses.association_loss(s, s, jnp.zeros((1, 4, 4), jnp.int32))


class AggregationTest(parameterized.TestCase):

  # 9 pixels per image. The forward's chunks: 1, 2 (the last chunk
  # overlaps its predecessor by one row), 4 (by three rows); the `cos`
  # backward's triangle (blocks of about 4 chunks): 3 blocks of 3 rows,
  # 2 blocks of 5 (overlapping by one row), 1 block.
  @parameterized.product(metric=["cos", "kl"], chunk_size=[None, 1, 2, 4])
  def test_value_and_gradient_match_reference(self, metric, chunk_size):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 3, 4))
    if metric == "kl":
      x = reference.softmax(x)
    w = rng.normal(size=x.shape)  # random cotangent
    with jax.enable_x64(True):
      f = lambda v: jnp.sum(w * losses.spatial_aggregate(
          v, metric, alpha=0.3, chunk_size=chunk_size))
      value, g = jax.value_and_grad(f)(jnp.asarray(x))
      out = losses.spatial_aggregate(jnp.asarray(x), metric, 0.3, chunk_size)
    np.testing.assert_allclose(out, reference.spatial_aggregate(x, metric,
                                                                0.3),
                               rtol=1e-10)
    ref = lambda v: np.sum(w * reference.spatial_aggregate(v, metric, 0.3,
                                                           frozen=x))
    np.testing.assert_allclose(value, ref(x), rtol=1e-10)
    np.testing.assert_allclose(g, reference.numeric_grad(ref, x), rtol=1e-5,
                               atol=1e-8)


class StatisticsTest(absltest.TestCase):

  def test_planted_one_to_one_correspondence(self):
    # Orthogonal source pixels; the target is a permutation of them, so
    # j*(i) = perm^-1(i) and every cycle returns to i.
    size = 6
    s = np.eye(size, dtype=np.float32).reshape(1, 2, 3, size)
    perm = np.array([3, 0, 5, 1, 4, 2])
    t = np.eye(size, dtype=np.float32)[perm].reshape(1, 2, 3, size)
    y = np.array([[[0, 1, 1], [2, 0, 255]]])
    out = losses.cycle_association(s, t, y, "cos", aggregate_target=False)
    np.testing.assert_array_equal(out["j_star"][0], np.argsort(perm))
    np.testing.assert_array_equal(out["i_star"][0], np.arange(size))
    stats = losses.association_statistics(out, size)
    self.assertAlmostEqual(float(stats["consistent"]), 1.0)
    self.assertAlmostEqual(float(stats["reached"]), 5 / 6)  # pixel 5 ignored
    self.assertNotIn("correct", stats)
    # Target labels: j*(i) carries the class of i except at the target
    # pixel source pixel 2 (class 1) lands on, which says 2, and the one
    # source pixel 3 (class 2) lands on, which is unlabelled.
    j = np.argsort(perm)
    t_labels = np.full((1, size), 255)
    t_labels[0, j[:5]] = y.reshape(-1)[:5]
    t_labels[0, j[2]] = 2
    t_labels[0, j[3]] = 255
    stats = losses.association_statistics(out, size, t_labels)
    # Consistent and j* labelled: source pixels 0, 1, 2, 4; right: 0, 1, 4.
    self.assertAlmostEqual(float(stats["correct"]), 3 / 4)
    confusion = losses.association_confusion(out, t_labels, 3)
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0] = 2  # pixels 0 and 4
    expected[1, 1] = 1  # pixel 1
    expected[1, 2] = 1  # pixel 2
    np.testing.assert_array_equal(confusion, expected)

  def test_everything_lands_on_one_target_pixel(self):
    s = np.ones((1, 2, 2, 3), np.float32)
    s[0, 0, 0] = [0.9, 1, 1]  # nearest to [1, 1, 1] too, but not i*
    t = np.zeros((1, 2, 2, 3), np.float32)
    t[0, 1, 1] = [1, 1, 1]
    t[0, :, :, 0] += 0.01
    y = np.array([[[0, 1], [1, 1]]])
    out = losses.cycle_association(s, t, y, "cos", aggregate_target=False)
    np.testing.assert_array_equal(out["j_star"][0], [3, 3, 3, 3])
    stats = losses.association_statistics(out, 4)
    self.assertAlmostEqual(float(stats["reached"]), 0.25)
    # i* is source pixel 1 (class 1): the three class-1 pixels are consistent.
    self.assertAlmostEqual(float(stats["consistent"]), 0.75)


if __name__ == "__main__":
  absltest.main()
