"""Tests of the method seam and the baselines (plca_jax/methods)."""

import os

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import test as test_config
from plca_jax import checkpointing
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import train
from plca_jax import writers
from plca_jax.data import input_pipeline
from plca_jax.data import transforms
from plca_jax.methods import adaptsegnet
from plca_jax.methods import base
from plca_jax.methods import fda
from plca_jax.methods import ldr
from plca_jax.methods import mbt
from plca_jax.methods import plca
from plca_jax.methods import pseudo_labels
from plca_jax.models import resnet



def _config(method, **block):
  config = test_config.get_config()
  config.method = method
  for key, value in block.items():
    config[method][key] = value
  return config


def _np_bce_logits(x, z):
  x = np.asarray(x, np.float64)
  return np.mean(-(z * np.log(1 / (1 + np.exp(-x))) +
                   (1 - z) * np.log(1 - 1 / (1 + np.exp(-x)))))


class RegistryTest(absltest.TestCase):

  def test_misspelt_method_lists_the_methods(self):
    config = _config("plca")
    config.method = "adaptsegnt"
    with self.assertRaisesRegex(ValueError, "'adaptsegnt'.*adaptsegnet, "
                                "dacs, fda, ldr, pixel_contrast, plca, "
                                "source_only"):
      methods.get_method(config)

  def test_every_method_block_is_in_the_default_config(self):
    config = test_config.get_config()
    for name, cls in methods.METHODS.items():
      if cls.default_config() is not None:
        self.assertEqual(config[name].to_dict(),
                         cls.default_config().to_dict())


class BatchNormOrderTest(absltest.TestCase):

  @pytest.mark.slow
  def test_plca_runs_target_then_source(self):
    # docs/method.md, Network: the release's running statistics are those
    # of a target pass followed by a source pass. Training-mode batch
    # statistics do not depend on the running ones, so each domain's pass
    # alone from the same start gives bs_d = m * bs0 + (1 - m) * mu_d, and target-then-source is
    # m * bs_t + (1 - m) * mu_s = m * bs_t + bs_s - m * bs0.
    config = _config("plca")
    config.loss.use_lovasz = False
    method = methods.get_method(config)
    model = method.model
    rng = np.random.default_rng(0)
    micro = {d: {"image": rng.integers(0, 256, (2, 32, 32, 3), np.uint8),
                 "label": rng.integers(0, 4, (2, 32, 32), np.uint8)}
             for d in base.DOMAINS}
    micro["target"]["image"] //= 2  # a different domain: other statistics
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params, bs0 = variables["params"], variables["batch_stats"]
    alone = {d: base.forward(model, params, bs0,
                             base.encode(micro[d]["image"], config))[1]
             for d in base.DOMAINS}
    _, (_, got) = plca.micro_batch_loss(params, bs0, micro, model=model,
                                        config=config)
    m = resnet.ResNet.bn_momentum
    order = lambda first, second: jax.tree.map(
        lambda a, b, z: m * a + b - m * z, alone[first], alone[second], bs0)
    target_first = order("target", "source")
    source_first = order("source", "target")
    gap = lambda x, y: max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        x, y)))
    self.assertLess(gap(got, target_first), 1e-5)
    self.assertGreater(gap(got, source_first), 1e-3)

  def test_one_pass_of_both_domains_equals_two_passes(self):
    # config.train.domains_in_one_pass: one batch of 2B with per-domain
    # BatchNorm groups gives what two passes give (float64: to rounding),
    # outputs, parameter gradients and running statistics, in half the
    # convolutions.
    config = _config("adaptsegnet")  # a model with the aux head too
    rng = np.random.default_rng(0)
    micro = {d: {"image": rng.integers(0, 256, (2, 32, 32, 3), np.uint8)}
             for d in base.DOMAINS}
    micro["target"]["image"] //= 2
    with jax.enable_x64(True):
      model = methods.get_method(config).model.clone(dtype=jnp.float64)
      variables = jax.tree.map(
          lambda a: jnp.asarray(a, jnp.float64),
          model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
      shapes = jax.eval_shape(lambda: model.apply(
          variables, jnp.zeros((2, 32, 32, 3)), train=False))
      weights = jax.tree.map(
          lambda a: jnp.asarray(rng.normal(size=a.shape)), (shapes, shapes))

      def loss(params, one_pass):
        config.train.domains_in_one_pass = one_pass
        out_s, out_t, stats = base.forward_pair(
            model, params, variables["batch_stats"], micro, config,
            first="target")
        total = sum(jnp.sum(w * o) for w, o in zip(
            jax.tree.leaves(weights), jax.tree.leaves((out_s, out_t))))
        return total, (out_s, out_t, stats)

      results = {one_pass: jax.grad(loss, has_aux=True)(
          variables["params"], one_pass) for one_pass in (True, False)}
      convs = {one_pass: str(jax.make_jaxpr(loss, static_argnums=1)(
          variables["params"], one_pass)).count("conv_general_dilated")
               for one_pass in (True, False)}
    self.assertEqual(2 * convs[True], convs[False])
    for got, want in zip(jax.tree.leaves(results[True]),
                         jax.tree.leaves(results[False])):
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)


class AdaptSegNetTest(absltest.TestCase):

  def test_discriminator_shapes_and_parameter_count(self):
    disc = adaptsegnet.FCDiscriminator()
    x = jnp.zeros((2, 96, 160, 19))
    variables = disc.init(jax.random.key(0), x)
    self.assertEqual(disc.apply(variables, x).shape, (2, 3, 5, 1))
    # Five 4x4 convs with bias: 19->64->128->256->512->1.
    chans = [19, 64, 128, 256, 512, 1]
    expected = sum(16 * a * b + b for a, b in zip(chans, chans[1:]))
    count = sum(p.size for p in jax.tree.leaves(variables["params"]))
    self.assertEqual(count, expected)
    # PyTorch's default init: |w| <= 1/sqrt(fan_in) per layer.
    w = variables["params"]["conv0"]["kernel"]
    self.assertLessEqual(float(jnp.max(jnp.abs(w))), 1 / np.sqrt(16 * 19))
    self.assertGreater(float(jnp.max(jnp.abs(w))), 0.9 / np.sqrt(16 * 19))

  def test_discriminator_matches_a_plain_convolution_stack(self):
    disc = adaptsegnet.FCDiscriminator(channels=(3, 2))
    x = jax.random.uniform(jax.random.key(1), (1, 8, 12, 2))
    params = disc.init(jax.random.key(0), x)["params"]
    out = np.asarray(disc.apply({"params": params}, x), np.float64)
    y = np.asarray(x, np.float64)
    for i in range(3):
      k = np.asarray(params[f"conv{i}"]["kernel"], np.float64)
      b = np.asarray(params[f"conv{i}"]["bias"], np.float64)
      pad = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))
      h, w = y.shape[1] // 2, y.shape[2] // 2
      z = np.zeros((1, h, w, k.shape[-1]))
      for r in range(h):
        for c in range(w):
          patch = pad[0, 2 * r:2 * r + 4, 2 * c:2 * c + 4]
          z[0, r, c] = np.einsum("hwi,hwio->o", patch, k) + b
      y = np.where(z > 0, z, 0.2 * z) if i < 2 else z
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)

  def test_adversarial_losses_match_a_plain_implementation(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 1)) * 3
    for label in (0.0, 1.0):
      np.testing.assert_allclose(
          adaptsegnet.bce_with_logits(jnp.asarray(logits), label),
          _np_bce_logits(logits, label), rtol=1e-5)
    disc = adaptsegnet.FCDiscriminator(channels=(4,))
    p_s = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, 8, 8, 3))), -1)
    p_t = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, 8, 8, 3))), -1)
    params = disc.init(jax.random.key(0), p_s)["params"]
    got = adaptsegnet.discriminator_loss(params, p_s, p_t,
                                         discriminator=disc)
    d_s = disc.apply({"params": params}, p_s)
    d_t = disc.apply({"params": params}, p_t)
    want = 0.5 * (_np_bce_logits(d_s, 0.0) + _np_bce_logits(d_t, 1.0))
    np.testing.assert_allclose(got, want, rtol=1e-5)

  @pytest.mark.slow
  def test_update_trains_both_trees_and_the_generator_only_by_its_loss(self):
    config = _config("adaptsegnet")
    method = methods.get_method(config)
    mesh = train.sharding.create_mesh()
    state = train.create_train_state(config, method, jax.random.key(0), mesh)
    self.assertEqual(sorted(state.extra), ["aux_discriminator",
                                           "discriminator"])
    self.assertIn("aux_classifier", state.params)
    before = jax.device_get(state)
    batch, _ = train.next_update_batch(
        input_pipeline.create_train_iterator(config), 2,
        {d: method.batch_fields(d) for d in ("source", "target")})
    step = train.create_train_step(config, method, mesh)
    state, scalars = step(state, batch, train.step_key(config))
    for name in ("discriminator", "aux_discriminator"):
      self.assertEqual(int(state.extra[name].step), 1)
      changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                             jax.device_get(state.extra[name].params),
                             before.extra[name].params)
      self.assertGreater(max(jax.tree.leaves(changed)), 0)
    for key in ("ce", "aux_ce", "adv", "aux_adv", "d_loss", "aux_d_loss",
                "discriminator_grad_norm"):
      self.assertTrue(np.isfinite(float(scalars[key])), key)
    expected = (scalars["ce"] + 0.1 * scalars["aux_ce"] +
                0.001 * scalars["adv"] + 0.0002 * scalars["aux_adv"])
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-5)


class MicroBatchLoopTest(absltest.TestCase):

  def test_scan_equals_the_python_loop(self):
    # The accelerators' lax.scan over micro-batches and the CPU's loop give
    # one update: parameters, BatchNorm statistics, scalars (the cheapest
    # method's update; the scan is the same for every method's trees).
    results = []
    for loop in ("loop", "scan"):
      config = _config("source_only")
      config.train.micro_batch_loop = loop
      method = methods.get_method(config)
      mesh = train.sharding.create_mesh()
      state = train.create_train_state(config, method, jax.random.key(0),
                                       mesh)
      batch, _ = train.next_update_batch(
          input_pipeline.create_train_iterator(config), 2,
          {d: method.batch_fields(d) for d in ("source", "target")})
      step = train.create_train_step(config, method, mesh)
      if loop == "scan":
        self.assertIn("while", step.lower(
            state, batch, train.step_key(config)).as_text())
      results.append(jax.device_get(step(state, batch,
                                         train.step_key(config))))
    (loop_state, loop_scalars), (scan_state, scan_scalars) = results
    self.assertEqual(sorted(loop_scalars), sorted(scan_scalars))
    for key, value in loop_scalars.items():
      np.testing.assert_allclose(scan_scalars[key], value, rtol=2e-5,
                                 atol=1e-6, err_msg=key)
    for tree in ("params", "batch_stats", "extra"):
      for a, b in zip(jax.tree.leaves(getattr(loop_state, tree)),
                      jax.tree.leaves(getattr(scan_state, tree))):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=tree)


class FDATest(absltest.TestCase):

  def _np_transfer(self, src, trg, beta):
    """The formula, per image and channel, in NumPy float64."""
    out = np.empty_like(src)
    h, w = src.shape[1:3]
    b = int(np.floor(min(h, w) * beta))
    for n in range(src.shape[0]):
      for c in range(src.shape[3]):
        fs, ft = np.fft.fft2(src[n, :, :, c]), np.fft.fft2(trg[n, :, :, c])
        amp, pha = np.abs(fs), np.angle(fs)
        amp_t = np.abs(ft)
        for rows in (slice(0, b), slice(h - b, h)):
          for cols in (slice(0, b), slice(w - b, w)):
            amp[rows, cols] = amp_t[rows, cols]
        out[n, :, :, c] = np.real(np.fft.ifft2(amp * np.exp(1j * pha)))
    return out

  def test_spectral_transfer_matches_numpy(self):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 255, (2, 20, 30, 3))
    trg = rng.uniform(0, 255, (2, 20, 30, 3))
    for beta in (0.01, 0.05, 0.09, 0.2):
      got = fda.spectral_transfer(jnp.asarray(src), jnp.asarray(trg), beta)
      np.testing.assert_allclose(np.asarray(got, np.float64),
                                 self._np_transfer(src, trg, beta),
                                 rtol=1e-4, atol=1e-2)
    # beta = 0.09 on 20 rows: b = 1; the image really changes.
    changed = fda.spectral_transfer(jnp.asarray(src), jnp.asarray(trg), 0.09)
    self.assertGreater(float(jnp.max(jnp.abs(changed - src))), 1.0)
    # The DC term (mean colour) comes from the target.
    np.testing.assert_allclose(
        np.asarray(changed).mean((1, 2)), trg.mean((1, 2)), rtol=1e-3)

  def test_beta_zero_returns_the_source(self):
    src = jnp.asarray(np.random.default_rng(1).uniform(0, 255, (1, 8, 8, 3)),
                      jnp.float32)
    out = fda.spectral_transfer(src, src[:, ::-1], 0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src))
    with self.assertRaisesRegex(ValueError, "same shape"):
      fda.spectral_transfer(src, src[:, :4], 0.05)

  def test_robust_entropy_matches_the_formula(self):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 6, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1) / np.log(7)
    want = np.mean((ent**2 + 1e-8)**2.0)
    np.testing.assert_allclose(fda.robust_entropy(jnp.asarray(logits), 2.0),
                               want, rtol=1e-5)
    # Its gradient against float64 central differences.
    with jax.enable_x64(True):
      x = jnp.asarray(logits[:1, :2, :2], jnp.float64)
      g = jax.grad(lambda v: fda.robust_entropy(v, 2.0))(x)
      for index in ((0, 1, 0, 3), (0, 0, 1, 6)):
        e = np.zeros(x.shape)
        e[index] = 1e-6
        fd = (fda.robust_entropy(x + e, 2.0) -
              fda.robust_entropy(x - e, 2.0)) / 2e-6
        self.assertGreater(abs(float(g[index])), 1e-6)
        np.testing.assert_allclose(g[index], fd, rtol=1e-5)


class MBTTest(absltest.TestCase):

  def test_thresholds_on_a_hand_built_example(self):
    # Class 0: 10 pixels valued k/16 (k = 1..10): round(0.66 * 10) = 7 ->
    # the 8th smallest, 8/16 = 0.5. Class 1: 3 pixels of 0.95 -> capped at
    # 0.9. Class 2: one pixel of 0.25 -> 0.25. Class 3: none -> 0.
    probs = np.array([k / 16 for k in range(1, 11)] + [0.95] * 3 + [0.25])
    label = np.array([0] * 10 + [1] * 3 + [2])
    q = mbt.quantize(probs)
    hist = np.stack([np.bincount(q[label == c], minlength=mbt.BINS)
                     for c in range(4)])
    thresholds = mbt.class_thresholds(hist)
    np.testing.assert_allclose(thresholds, [0.5, 0.9, 0.25, 0.0])
    out = mbt.apply_thresholds(label[None], q[None], thresholds)[0]
    np.testing.assert_array_equal(
        out, [255] * 7 + [0] * 3 + [1] * 3 + [2])

  def test_pseudo_labels_are_read_and_augmented_with_the_image(self):
    config = test_config.get_config()
    source = input_pipeline.create_source(config.data.target, config.data,
                                          config.model.num_classes)
    directory = self.create_tempdir().full_path
    for i in range(len(source)):
      element = source[i]
      # The pseudo-label is the image's red channel quantised: any geometric
      # transform of the image must transform it the same way.
      pseudo_labels.write(directory, element["name"],
                          element["image"][..., 0] // 32)
    wrapped = pseudo_labels.WithPseudoLabels(source, directory)
    config.fda.pseudo_label_dir = directory
    config.method = "fda"
    # No rescaling (the shorter edge stays 32), so that the bilinear image
    # and the nearest labels stay comparable pixel for pixel; flips and
    # crops still apply.
    config.data.resize_min = config.data.resize_max = 32
    config.data.crop_size = (24, 40)
    method = methods.get_method(config)
    it = input_pipeline.create_train_iterator(config,
                                              wrap_source=method.wrap_source)
    batch = next(it)["target"]
    self.assertEqual(batch["pseudo_label"].shape, batch["label"].shape)
    valid = batch["pseudo_label"] != 255  # padding
    np.testing.assert_array_equal(batch["pseudo_label"][valid],
                                  (batch["image"][..., 0] // 32)[valid])
    self.assertEqual(wrapped[0]["pseudo_label"].dtype, np.uint8)
    with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
      pseudo_labels.WithPseudoLabels(source, directory + "/missing")
    os.remove(pseudo_labels.path_of(directory, source[1]["name"]))
    with self.assertRaisesRegex(FileNotFoundError, source[1]["name"]):
      wrapped[1]  # pylint: disable=pointless-statement


class PixelContrastTest(absltest.TestCase):

  def test_grayscale_input_is_pillows_luma(self):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), np.uint8)
    gray = transforms.grayscale(image)
    want = np.asarray(Image.fromarray(image).convert("L"), np.float32)
    for c in range(3):  # Pillow rounds to integers
      np.testing.assert_allclose(gray[..., c], want, atol=0.5)
    config = _config("pixel_contrast")
    config.data.grayscale = True
    np.testing.assert_allclose(
        transforms.network_input(image, config.data),
        transforms.encode(gray, config.data.encoding))

  @pytest.mark.slow
  def test_stage2_update_adds_the_contrastive_term(self):
    config = _config("pixel_contrast")
    source = input_pipeline.create_source(config.data.target, config.data,
                                          config.model.num_classes)
    directory = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    for i in range(len(source)):
      element = source[i]
      pseudo = rng.integers(0, 3, element["image"].shape[:2])
      pseudo[:, :4] = 255
      pseudo_labels.write(directory, element["name"], pseudo)
    config.pixel_contrast.pseudo_label_dir = directory
    method = methods.get_method(config)
    self.assertEqual(method.batch_fields("target"), ("image", "pseudo_label"))
    mesh = train.sharding.create_mesh()
    state = train.create_train_state(config, method, jax.random.key(0), mesh)
    batch, _ = train.next_update_batch(
        input_pipeline.create_train_iterator(config,
                                             wrap_source=method.wrap_source),
        2, {d: method.batch_fields(d) for d in ("source", "target")})
    step = train.create_train_step(config, method, mesh)
    _, scalars = step(state, batch, train.step_key(config))
    block = config.pixel_contrast
    self.assertGreater(float(scalars["contrast"]), 0.0)
    expected = (scalars["ce"] + block.entropy_weight * scalars["entropy"] +
                block.contrast_weight * scalars["contrast"])
    np.testing.assert_allclose(scalars["loss"], expected, rtol=1e-5)


def _ldr_config(translation_steps=2):
  """LDR on the test config with 4-channel GAN networks."""
  config = _config("ldr", translation_steps=translation_steps,
                   gen_channels=4, gen_blocks=1, disc_channels=4,
                   recon_channels=4, recon_blocks=1, recon_disc_channels=4,
                   output_disc_channels=(4, 4, 4, 4))
  config.eval.aggregate = False
  return config


def _networks(workdir, step, config, method):
  """{tree: (params, batch_stats)} and {tree: optimizer state} as NumPy,
  from WORKDIR's checkpoint at `step` (0: the initial state)."""
  mesh = train.sharding.create_mesh()
  state = train.create_train_state(config, method, jax.random.key(config.seed),
                                   mesh)
  if step:
    state = checkpointing.restore(checkpointing.create_manager(workdir), step,
                                  state, input_pipeline.create_train_iterator(
                                      config))
  trees = {base.SEGMENTATION: state, **state.extra}
  return jax.device_get(({n: (t.params, t.batch_stats)
                          for n, t in trees.items()},
                         {n: t.opt_state for n, t in trees.items()}))


def _changed(before, after):
  """Names of the trees whose leaves differ."""
  return {n for n in before if any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[n]),
                                               jax.tree.leaves(after[n])))}


class LDRTest(absltest.TestCase):

  @pytest.mark.slow
  def test_reconstruction_reaches_the_segmentation_network_scaled(self):
    # The segmentation gradient is d(seg objective) + lambda_recon *
    # d(recon): affine in lambda_recon, whose forward value is unused.
    config = _ldr_config()
    batch, _ = train.next_update_batch(
        input_pipeline.create_train_iterator(config), 1,
        {"source": ("image", "label"), "target": ("image",)})
    micro = jax.tree.map(lambda x: x[0], batch)
    variables = None
    grads = []
    for weight in (0.0, 0.5, 1.0):
      config.ldr.lambda_recon = weight
      method = methods.get_method(config)
      if variables is None:
        state = train.create_train_state(
            config, method, jax.random.key(0), train.sharding.create_mesh())
        variables = train.network_variables(state)
      g, _, terms = jax.jit(method.adaptation_grads)(variables, micro)
      grads.append(flatten_util.ravel_pytree(g[base.SEGMENTATION])[0])
      self.assertGreater(float(terms["recon"]), 0.0)
    step = grads[2] - grads[1]  # large: cancellation sets the tolerance
    np.testing.assert_allclose(step, grads[1] - grads[0], rtol=1e-3,
                               atol=1e-6 * float(jnp.abs(step).max()))
    self.assertGreater(float(jnp.abs(grads[2] - grads[0]).max()),
                       1e-4 * float(jnp.abs(grads[0]).max()))

  @pytest.mark.slow
  def test_phases_resume_and_evaluation_through_the_translator(self):
    config = _ldr_config(translation_steps=2)
    config.train.log_every = 1
    method = methods.get_method(config)
    self.assertEqual([method.phase_of(s) for s in range(4)], [0, 0, 1, 1])
    reference = self.create_tempdir().full_path
    train.train_and_evaluate(config, reference)  # evaluates at step 4
    records = writers.read_metrics(reference)
    final = [r for r in records if "eval/miou" in r][-1]
    logged = {r["step"]: r for r in records if "train/loss" in r}
    # Each phase updates its own trees only, and their optimizer states;
    # the others keep parameters, statistics and optimizer state exactly.
    translation = set(ldr.TRANSLATION_TREES)
    adaptation = set(ldr.ADAPTATION_TREES) | {base.SEGMENTATION}
    nets, opts = zip(*[_networks(reference, s, config, method)
                       for s in (0, 2, 4)])
    self.assertEqual(_changed(nets[0], nets[1]), translation)
    self.assertEqual(_changed(opts[0], opts[1]), translation)
    self.assertEqual(_changed(nets[1], nets[2]), adaptation)
    self.assertEqual(_changed(opts[1], opts[2]), adaptation)
    for step in (1, 2):  # phase 0
      self.assertGreater(logged[step]["train/cycle"], 0.0)
      self.assertEqual(logged[step]["train/loss"], 0.0)
      self.assertEqual(logged[step]["train/reconstructor_grad_norm"], 0.0)
    block = config.ldr
    for step in (3, 4):  # phase 1
      r = {k[len("train/"):]: v for k, v in logged[step].items()
           if k.startswith("train/")}
      self.assertEqual(r["cycle"], 0.0)
      self.assertEqual(r["translator_ts_grad_norm"], 0.0)
      np.testing.assert_allclose(
          r["loss"], r["ce"] + block.lambda_pseudo * r["pseudo_ce"] +
          block.lambda_adv * r["adv"] + block.lambda_recon * r["recon"],
          rtol=1e-5)

    # Stopped inside phase 0 after update 1, resumed to 4 (phase 1 from 3).
    workdir = self.create_tempdir().full_path
    stopped = config.copy_and_resolve_references()
    stopped.train.num_steps = 1
    train.train_and_evaluate(stopped, workdir, evaluate_during_training=False)
    self.assertEqual(checkpointing.create_manager(workdir).latest_step(), 1)
    train.train_and_evaluate(config, workdir, evaluate_during_training=False)

    def scalars(path):
      return {r["step"]: (r["train/translation_loss"], r["train/loss"],
                          r["train/recon"], r["train/d_loss"])
              for r in writers.read_metrics(path) if "train/loss" in r}

    want, got = scalars(reference), scalars(workdir)
    self.assertEqual(sorted(got), [1, 2, 3, 4])
    for step in (2, 3, 4):
      np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
    # --mode=eval on the resumed workdir: the translate-then-segment network
    # from every tree of its checkpoint; the same score as the reference's
    # own final evaluation (same parameters).
    scores = evaluate.evaluate_checkpoint(config, workdir, method=method)
    np.testing.assert_allclose(scores["miou"], final["eval/miou"], atol=1e-6)
    # Without translation the segmentation network alone is evaluated.
    config.ldr.translate_at_eval = False
    plain = methods.get_method(config)
    self.assertIs(plain.eval_model(), plain.model)


class TrainEveryMethodTest(parameterized.TestCase):

  # adaptsegnet: ResumeTest trains and evaluates it.
  @parameterized.parameters("source_only", "fda", "pixel_contrast")
  @pytest.mark.slow
  def test_trains_and_evaluates(self, name):
    config = _config(name)
    config.data.grayscale = name == "pixel_contrast"  # its stage 1
    config.train.num_steps = 2
    config.eval.aggregate = False
    workdir = self.create_tempdir().full_path
    state = train.train_and_evaluate(config, workdir)
    self.assertEqual(int(state.step), 2)
    records = writers.read_metrics(workdir)
    train_rec = [r for r in records if "train/loss" in r][-1]
    self.assertTrue(np.isfinite(train_rec["train/loss"]))
    self.assertIn("train/learning_rate", train_rec)
    self.assertTrue(np.isfinite(
        [r for r in records if "eval/miou" in r][-1]["eval/miou"]))


class ResumeTest(absltest.TestCase):

  @pytest.mark.slow
  def test_adaptsegnet_resumes_every_tree_to_the_same_losses(self):
    reference = self.create_tempdir().full_path
    config = _config("adaptsegnet")
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.eval.aggregate = False
    train.train_and_evaluate(config, reference)  # evaluates at step 4
    records = writers.read_metrics(reference)
    self.assertTrue(np.isfinite(records[-1]["eval/miou"]))
    last = [r for r in records if "train/loss" in r][-1]
    # Adam's poly schedule at the 4th update (step 3 of a 5-step horizon).
    np.testing.assert_allclose(last["train/discriminator_learning_rate"],
                               1e-4 * (1 - 3 / 5)**0.9, rtol=1e-5)

    # Stopped after update 2 (a SIGTERM'd or killed run resumes from its
    # last checkpoint the same way: train_test), then resumed to 4.
    workdir = self.create_tempdir().full_path
    stopped = config.copy_and_resolve_references()
    stopped.train.num_steps = 2
    train.train_and_evaluate(stopped, workdir, evaluate_during_training=False)
    manager = checkpointing.create_manager(workdir)
    start = manager.latest_step()
    self.assertEqual(start, 2)
    train.train_and_evaluate(config, workdir, evaluate_during_training=False)

    def losses(path):
      return {r["step"]: (r["train/loss"], r["train/d_loss"],
                          r["train/aux_d_loss"])
              for r in writers.read_metrics(path) if "train/loss" in r}

    want, got = losses(reference), losses(workdir)
    for step in range(start + 1, 5):
      np.testing.assert_allclose(got[step], want[step], rtol=1e-5)
    # The final parameters of every tree, restored from both workdirs.
    method = methods.get_method(config)
    mesh = train.sharding.create_mesh()
    finals = []
    for path in (reference, workdir):
      abstract = train.create_train_state(config, method, jax.random.key(0),
                                          mesh)
      manager = checkpointing.create_manager(path)
      self.assertEqual(manager.latest_step(), 4)
      state = checkpointing.restore(manager, 4, abstract,
                                    input_pipeline.create_train_iterator(
                                        config))
      finals.append(jax.device_get((state.params,
                                    {k: t.params for k, t in
                                     state.extra.items()})))
    for a, b in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])):
      np.testing.assert_allclose(a, b, atol=1e-5)


class CheckpointCompatibilityTest(absltest.TestCase):

  @pytest.mark.slow
  def test_a_checkpoint_without_extra_restores_and_a_method_mismatch_fails(
      self):
    config = _config("plca")
    method = methods.get_method(config)
    mesh = train.sharding.create_mesh()
    state = train.create_train_state(config, method, jax.random.key(0), mesh)
    it = input_pipeline.create_train_iterator(config)
    workdir = self.create_tempdir().full_path
    manager = checkpointing.create_manager(workdir)
    legacy = {"step": state.step, "params": state.params,
              "opt_state": state.opt_state, "batch_stats": state.batch_stats}
    manager.save(3, args=checkpointing.ocp.args.Composite(
        state=checkpointing.ocp.args.StandardSave(legacy)))
    manager.wait_until_finished()
    # The data item of that time: grain's per-process file (6 batches read).
    data = os.path.join(workdir, "checkpoints", "3", "data")
    os.makedirs(data)
    with open(os.path.join(data, "process_0-of-1.json"), "w") as f:
      f.write('{"next_index": 6}')
    restored = checkpointing.restore(manager, 3, state, it)
    self.assertEqual(restored.extra, {})
    np.testing.assert_array_equal(
        jax.tree.leaves(restored.params)[0], jax.tree.leaves(state.params)[0])
    fresh = input_pipeline.create_train_iterator(config)
    expected = [next(fresh) for _ in range(7)][6]
    np.testing.assert_array_equal(next(it)["target"]["image"],
                                  expected["target"]["image"])
    # Written by two processes: only two processes can continue it.
    os.rename(os.path.join(data, "process_0-of-1.json"),
              os.path.join(data, "process_0-of-2.json"))
    with self.assertRaisesRegex(ValueError, r"written by \[2\] process\(es\)"
                                r"; this run has 1"):
      checkpointing.restore(manager, 3, state, it)
    other = _config("adaptsegnet")
    other_method = methods.get_method(other)
    abstract = train.create_train_state(other, other_method,
                                        jax.random.key(0), mesh)
    with self.assertRaisesRegex(ValueError, "config.method"):
      checkpointing.restore(manager, 3, abstract, it)


if __name__ == "__main__":
  absltest.main()
