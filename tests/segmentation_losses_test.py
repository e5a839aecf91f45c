"""Tests of CE, Lovasz-softmax, LSR, resampling and the total objective."""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import pytest

from configs import default as default_config
from configs import synthia as synthia_config
from plca_jax import losses
from plca_jax.losses import objective
from plca_jax.losses import segmentation
from tests import reference


def _torch_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


class ResampleTest(parameterized.TestCase):

  @parameterized.parameters((730, 92), (760, 95), (512, 64), (97, 13),
                            (1024, 128), (33, 5), (7, 7))
  def test_downsample_labels_matches_torch_nearest(self, size_in, size_out):
    rng = np.random.default_rng(size_in)
    labels = rng.integers(0, 256, size=(2, size_in, size_in + 3))
    out_size = (size_out, size_out + 1)
    ours = losses.downsample_labels(jnp.asarray(labels), out_size)
    theirs = F.interpolate(torch.from_numpy(labels[:, None].astype(
        np.float32)), size=out_size, mode="nearest")[:, 0].numpy()
    np.testing.assert_array_equal(ours, theirs.astype(labels.dtype))

  def test_nearest_uses_float32_rule(self):
    # Some size pair must differ from the exact integer rule, else the test
    # above could not tell the two apart.
    differs = []
    for size_in in range(700, 1100):
      for size_out in (88, 92, 95, 120, 128):
        exact = np.minimum(np.arange(size_out) * size_in // size_out,
                           size_in - 1)
        if not np.array_equal(
            losses.segmentation.nearest_indices(size_in, size_out), exact):
          differs.append((size_in, size_out))
    self.assertNotEmpty(differs)
    size_in, size_out = differs[0]
    labels = np.arange(size_in)[None, :, None] * np.ones((1, 1, 2), int)
    theirs = F.interpolate(torch.from_numpy(labels[:, None].astype(
        np.float64)), size=(size_out, 2), mode="nearest")[0, 0, :, 0].numpy()
    np.testing.assert_array_equal(
        losses.downsample_labels(labels, (size_out, 2))[0, :, 0], theirs)

  @parameterized.parameters(((5, 7), (40, 56)), ((92, 92), (730, 730)),
                            ((12, 10), (5, 4)))
  def test_upsample_bilinear_matches_torch(self, size_in, size_out):
    x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(
        np.float32)
    ours = losses.upsample_bilinear(jnp.asarray(x), size_out)
    theirs = F.interpolate(_torch_nchw(x), size=size_out, mode="bilinear",
                           align_corners=False).numpy()
    np.testing.assert_allclose(ours, np.moveaxis(theirs, 1, -1), atol=2e-6)


class CrossEntropyTest(absltest.TestCase):

  def test_value_and_gradient(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5))
    labels = rng.integers(0, 5, size=(2, 3, 4))
    labels[0, 0] = 255
    with jax.enable_x64(True):
      value, g = jax.value_and_grad(losses.cross_entropy)(
          jnp.asarray(logits), jnp.asarray(labels))
    ref = lambda z: reference.cross_entropy(z, labels)
    np.testing.assert_allclose(value, ref(logits), rtol=1e-12)
    np.testing.assert_allclose(g, reference.numeric_grad(ref, logits),
                               rtol=1e-6, atol=1e-9)

  def test_all_ignored_is_zero(self):
    value, g = jax.value_and_grad(losses.cross_entropy)(
        jnp.ones((1, 2, 2, 3)), jnp.full((1, 2, 2), 255))
    self.assertEqual(float(value), 0.0)
    np.testing.assert_array_equal(g, 0.0)

  def test_size_mismatch_is_a_clear_error(self):
    with self.assertRaisesRegex(ValueError, "upsample"):
      losses.cross_entropy(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 4, 4), int))


class LovaszTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(num_classes=4, present=(0, 1, 2, 3), ignore_frac=0.0),
      dict(num_classes=5, present=(1, 3), ignore_frac=0.3),
      dict(num_classes=3, present=(2,), ignore_frac=0.2))
  def test_value_and_gradient(self, num_classes, present, ignore_frac):
    rng = np.random.default_rng(num_classes)
    probs = reference.softmax(rng.normal(size=(2, 4, 5, num_classes)))
    labels = rng.choice(present, size=(2, 4, 5))
    labels[rng.random(labels.shape) < ignore_frac] = 255
    with jax.enable_x64(True):
      value, g = jax.value_and_grad(losses.lovasz_softmax)(
          jnp.asarray(probs), jnp.asarray(labels))
    ref = lambda p: reference.lovasz_softmax(p, labels, frozen=probs)
    np.testing.assert_allclose(value, ref(probs), rtol=1e-12)
    np.testing.assert_allclose(g, reference.numeric_grad(ref, probs),
                               rtol=1e-6, atol=1e-9)

  def test_accelerator_form_sorts_instead_of_gathering(self):
    # TPU and GPU programs weight the unsorted errors by the Jaccard
    # weights sorted back (no gather): the float64 reference's value and
    # gradient, with ties and ignored pixels, as the CPU form.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 6, 4))
    logits[1, :2] = logits[1, 2:4]  # tied errors
    probs = reference.softmax(logits)
    labels = rng.integers(0, 4, size=(2, 5, 6))
    labels[rng.random(labels.shape) < 0.2] = 255
    with mock.patch.object(segmentation.xla, "on_cpu", return_value=False):
      with jax.enable_x64(True):
        value, g = jax.value_and_grad(losses.lovasz_softmax)(
            jnp.asarray(probs), jnp.asarray(labels))
        text = jax.jit(losses.lovasz_softmax).lower(
            jnp.asarray(probs), jnp.asarray(labels)).as_text()
    self.assertNotIn("gather", text)
    ref = lambda p: reference.lovasz_softmax(p, labels, frozen=probs)
    np.testing.assert_allclose(value, ref(probs), rtol=1e-12)
    np.testing.assert_allclose(g, reference.numeric_grad(ref, probs),
                               rtol=1e-6, atol=1e-9)

  def test_host_sort_equals_xla_sort(self):
    # The NumPy order (single CPU device) and XLA's sort give the same loss
    # and gradient, ties and ignored pixels included; under jit, as in the
    # train step.
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 6, 7, 4))
    logits[0, :2] = logits[0, 2:4]  # rows of tied errors
    probs = jnp.asarray(reference.softmax(logits), jnp.float32)
    labels = rng.integers(0, 4, size=(2, 6, 7))
    labels[rng.random(labels.shape) < 0.2] = 255
    outs = [jax.jit(jax.value_and_grad(functools.partial(
        losses.lovasz_softmax, host_sort=host)))(probs, labels)
            for host in (True, False)]
    self.assertGreater(float(outs[0][0]), 0.0)
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    # The stable order: ties (also of 0.0 and -0.0) keep their row order,
    # negative keys (the ignored pixels' -1) go last.
    key = rng.random((50, 3)).astype(np.float32)
    key[::7] = key[3]
    key[5:9] = np.array([0.0, -0.0, 0.0, -0.0])[:, None]
    key[20:25] = -1.0
    order = segmentation.descending_order(jnp.asarray(key), host_sort=True)
    np.testing.assert_array_equal(order, np.argsort(-key, 0, kind="stable"))

  def test_whole_batch_not_per_image(self):
    rng = np.random.default_rng(1)
    probs = reference.softmax(rng.normal(size=(2, 3, 3, 3)))
    labels = rng.integers(0, 3, size=(2, 3, 3))
    whole = float(losses.lovasz_softmax(probs.astype(np.float32), labels))
    per_image = np.mean([reference.lovasz_softmax(probs[i:i + 1],
                                                  labels[i:i + 1])
                         for i in range(2)])
    np.testing.assert_allclose(whole, reference.lovasz_softmax(probs, labels),
                               rtol=1e-5)
    self.assertGreater(abs(whole - per_image), 1e-4)

  def test_all_ignored_is_zero(self):
    self.assertEqual(float(losses.lovasz_softmax(
        jnp.full((1, 2, 2, 3), 1 / 3), jnp.full((1, 2, 2), 255))), 0.0)


class LsrTest(absltest.TestCase):

  def test_value_and_gradient(self):
    logits = np.random.default_rng(0).normal(size=(2, 3, 3, 4)) * 3
    with jax.enable_x64(True):
      value, g = jax.value_and_grad(losses.lsr_loss)(jnp.asarray(logits),
                                                     10.0)
    ref = lambda z: reference.lsr(z, 10.0, frozen=logits)
    np.testing.assert_allclose(value, ref(logits), rtol=1e-12)
    np.testing.assert_allclose(g, reference.numeric_grad(ref, logits),
                               rtol=1e-6, atol=1e-9)


class ObjectiveTest(parameterized.TestCase):

  def _inputs(self):
    rng = np.random.default_rng(0)
    out = lambda: {"features": rng.normal(size=(2, 3, 4, 6)),
                   "logits": rng.normal(size=(2, 3, 4, 4))}
    labels = rng.integers(0, 4, size=(2, 24, 32))
    labels[:, :4] = 255
    return out(), out(), labels

  @pytest.mark.slow
  def test_total_is_the_weighted_sum_of_reference_terms(self):
    src, tgt, labels = self._inputs()
    with jax.enable_x64(True):
      total, terms = losses.plca_objective(
          jax.tree.map(jnp.asarray, src), jax.tree.map(jnp.asarray, tgt),
          jnp.asarray(labels), chunk_size=5)
    up = np.moveaxis(F.interpolate(_torch_nchw(src["logits"]), size=(24, 32),
                                   mode="bilinear", align_corners=False)
                     .numpy(), 1, -1)
    grid = F.interpolate(torch.from_numpy(labels[:, None].astype(float)),
                         size=(3, 4), mode="nearest")[:, 0].numpy().astype(int)
    expected = {
        "ce": reference.cross_entropy(up, labels),
        "lovasz": reference.lovasz_softmax(reference.softmax(up), labels),
        "fass": reference.cycle(src["features"], tgt["features"], grid,
                                "cos")[0],
        "cass": reference.cycle(reference.softmax(src["logits"]),
                                reference.softmax(tgt["logits"]), grid,
                                "kl")[0],
        "lsr_source": reference.lsr(src["logits"]),
        "lsr_target": reference.lsr(tgt["logits"]),
    }
    for key, value in expected.items():
      np.testing.assert_allclose(terms[key], value, rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(
        total, expected["ce"] + 1.5 * expected["lovasz"] + 0.1 * (
            expected["fass"] + expected["cass"]) + 0.01 * (
                expected["lsr_source"] + expected["lsr_target"]), rtol=1e-9)
    for key in ("fass_consistent", "fass_reached", "cass_consistent",
                "cass_reached"):
      self.assertBetween(float(terms[key]), 0.0, 1.0)

  @pytest.mark.slow
  def test_target_labels_feed_statistics_only(self):
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    rng = np.random.default_rng(3)
    t_labels = [rng.integers(0, 4, size=labels.shape) for _ in range(2)]

    def total(tgt_features, t_labels):
      out = dict(tgt, features=tgt_features)
      return losses.plca_objective(src, out, labels, target_labels=t_labels)

    grad_fn = jax.value_and_grad(total, has_aux=True)
    (loss0, terms0), grad0 = grad_fn(tgt["features"], None)
    results = [grad_fn(tgt["features"], t) for t in t_labels]
    self.assertNotIn("fass_correct", terms0)
    for (loss, terms), grad in results:
      self.assertEqual(float(loss), float(loss0))
      np.testing.assert_array_equal(grad, grad0)
      for name in ("fass", "cass"):
        self.assertBetween(float(terms[f"{name}_correct"]), 0.0, 1.0)
    # Different labels, different statistics: the labels are really read.
    self.assertNotEqual(
        [float(results[0][0][1][f"{n}_correct"]) for n in ("fass", "cass")],
        [float(results[1][0][1][f"{n}_correct"]) for n in ("fass", "cass")])

  @parameterized.named_parameters(
      ("source_only", dict(use_lovasz=False, use_fass=False, use_cass=False,
                           use_lsr=False), {"ce"}),
      ("lovasz", dict(use_fass=False, use_cass=False, use_lsr=False),
       {"ce", "lovasz"}),
      ("fass", dict(use_cass=False, use_lsr=False), {"ce", "lovasz", "fass"}),
      ("cass", dict(use_lsr=False), {"ce", "lovasz", "fass", "cass"}),
      ("full", {}, {"ce", "lovasz", "fass", "cass", "lsr_source",
                    "lsr_target"}))
  @pytest.mark.slow
  def test_ablation_ladder_switches(self, switches, expected_losses):
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    total, terms = losses.plca_objective(src, tgt, labels, **switches)
    loss_keys = {k for k in terms if not k.endswith(("_consistent",
                                                     "_reached", "_correct"))}
    self.assertEqual(loss_keys, expected_losses)
    weights = {"ce": 1.0, "lovasz": 1.5, "fass": 0.1, "cass": 0.1,
               "lsr_source": 0.01, "lsr_target": 0.01}
    np.testing.assert_allclose(
        total, sum(weights[k] * terms[k] for k in loss_keys), rtol=1e-6)

  def test_sim_plca_and_no_aggregation_change_the_association(self):
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    _, base = losses.plca_objective(src, tgt, labels)
    _, sim = losses.plca_objective(src, tgt, labels, sim_plca=True)
    _, noagg = losses.plca_objective(src, tgt, labels, aggregate_target=False)
    self.assertNotAlmostEqual(float(base["fass"]), float(sim["fass"]))
    self.assertNotAlmostEqual(float(base["fass"]), float(noagg["fass"]))
    self.assertEqual(float(base["ce"]), float(sim["ce"]))

  def test_total_loss_reads_the_config(self):
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    config = default_config.get_config()
    config.loss.use_cass = False
    config.loss.lovasz_weight = 0.75
    config.loss.chunk_size = 5
    config.loss.chunk_above_pixels = 0  # chunked although the images are small
    total, terms = losses.total_loss(config, src, tgt, labels)
    expected, expected_terms = losses.plca_objective(
        src, tgt, labels, use_cass=False, lovasz_weight=0.75)
    self.assertNotIn("cass", terms)
    self.assertEqual(set(terms), set(expected_terms))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    # The paper config's weights, as the config states them (beta1 = 3.0,
    # the release's effective weight on its 2-GPU launch).
    paper = synthia_config.get_config()
    paper.loss.chunk_size = 5
    paper.loss.chunk_above_pixels = 0
    total, terms = losses.total_loss(paper, src, tgt, labels)
    c = paper.loss
    self.assertEqual(c.lovasz_weight, 3.0)
    np.testing.assert_allclose(
        total, terms["ce"] + c.lovasz_weight * terms["lovasz"] +
        c.association_weight * (terms["fass"] + terms["cass"]) +
        c.lsr_weight * (terms["lsr_source"] + terms["lsr_target"]),
        rtol=1e-6)

  def test_lovasz_sort_choice(self):
    # config.loss.lovasz_sort: the host sort is a callback in the compiled
    # objective ("auto" on this one CPU device, "host"), XLA's sort is not
    # ("xla"), and all give the same total; a misspelt value names the key.
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    config = default_config.get_config()
    self.assertEqual(config.loss.lovasz_sort, "auto")
    totals, callbacks = {}, {}
    for choice in ("auto", "host", "xla"):
      config.loss.lovasz_sort = choice
      frozen = config.copy_and_resolve_references()
      fn = jax.jit(lambda s, t, c=frozen: losses.total_loss(c, s, t,
                                                            labels)[0])
      text = fn.lower(src, tgt).as_text()
      callbacks[choice] = "callback" in text
      totals[choice] = float(fn(src, tgt))
    self.assertEqual(callbacks, {"auto": True, "host": True, "xla": False})
    self.assertEqual(totals["auto"], totals["xla"])
    self.assertEqual(totals["host"], totals["xla"])
    config.loss.lovasz_sort = "numpy"
    with self.assertRaisesRegex(ValueError,
                                "lovasz_sort='numpy'.*'auto', 'host', 'xla'"):
      losses.total_loss(config, src, tgt, labels)

  def test_small_images_run_the_association_unchunked(self):
    src, tgt, labels = self._inputs()  # 3 x 4 = 12 grid pixels
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    config = default_config.get_config()
    config.loss.chunk_size = 5
    seen = {}
    for above in (12, 11, 0):
      config.loss.chunk_above_pixels = above
      with mock.patch.object(objective, "cycle_association",
                             wraps=losses.cycle_association) as spy:
        total, _ = losses.total_loss(config, src, tgt, labels)
      self.assertLen(spy.call_args_list, 2)  # fass and cass
      seen[above] = {c.kwargs["chunk_size"] for c in spy.call_args_list}
      seen[f"{above}_total"] = float(total)
    self.assertEqual(seen[12], {None})  # 12 pixels: not more than 12
    self.assertEqual(seen[11], {5})
    self.assertEqual(seen[0], {5})
    self.assertAlmostEqual(seen["12_total"], seen["11_total"], places=5)
    grid = lambda side: np.zeros((1, side, side, 1))
    self.assertEqual(losses.chunk_for(256, 4096, grid(92)), 256)  # 730x730
    self.assertIsNone(losses.chunk_for(256, 4096, grid(41)))  # 321x321
    self.assertIsNone(losses.chunk_for(None, 0, grid(92)))
    # The larger of two maps decides.
    self.assertEqual(losses.chunk_for(256, 4096, grid(41), grid(92)), 256)

  def test_gradients_are_finite_under_jit(self):
    src, tgt, labels = self._inputs()
    src, tgt = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), o)
                for o in (src, tgt))
    grads = jax.jit(jax.grad(
        lambda a, b: losses.plca_objective(a, b, labels, chunk_size=4)[0],
        argnums=(0, 1)))(src, tgt)
    for g in jax.tree.leaves(grads):
      self.assertTrue(np.all(np.isfinite(g)))
    self.assertGreater(float(jnp.abs(grads[1]["features"]).max()), 0.0)


if __name__ == "__main__":
  absltest.main()
