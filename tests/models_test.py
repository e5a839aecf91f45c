"""Tests of the DeepLab-V2 / ResNet models (docs/method.md, Network)."""

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import pytest

from configs import default as default_config
from plca_jax import models
from plca_jax import xla
from plca_jax.models import conv as conv_lib
from plca_jax.models import resnet


def _abstract_variables(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda v: model.init(jax.random.key(0), v), x), x


def _train_loss_and_grads(model, variables, x):
  """((a loss of the train-mode outputs, new BatchNorm statistics),
  parameter gradients)."""
  def fn(params):
    out, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        jnp.asarray(x), train=True, mutable=["batch_stats"])
    value = jnp.sum(out["logits"] ** 2) + jnp.sum(out["features"])
    return value, updates["batch_stats"]
  return jax.value_and_grad(fn, has_aux=True)(variables["params"])


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _bytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


class DeepLabV2Test(parameterized.TestCase):

  @parameterized.parameters(
      # depth, classes, backbone params (incl. BN scale/bias), feature dim;
      # backbone counts are torchvision's resnetN minus its fc layer.
      (101, 16, 44_549_160 - 2048 * 1000 - 1000, 2048),
      (50, 19, 25_557_032 - 2048 * 1000 - 1000, 2048),
      (18, 16, 11_689_512 - 512 * 1000 - 1000, 512))
  def test_parameter_count_and_output_shapes(self, depth, num_classes,
                                             backbone_params, channels):
    model = models.DeepLabV2(num_classes=num_classes, depth=depth)
    variables, x = _abstract_variables(model, (2, 730, 730, 3))
    params = variables["params"]
    self.assertEqual(_count(params["backbone"]), backbone_params)
    self.assertEqual(_count(params["classifier"]),
                     4 * 3 * 3 * channels * num_classes)
    if (depth, num_classes) == (101, 16):  # the README's figure
      self.assertEqual(_count(params), 43_679_808)
    out = jax.eval_shape(lambda v, i: model.apply(v, i), variables, x)
    self.assertEqual(out["features"].shape, (2, 92, 92, channels))
    self.assertEqual(out["logits"].shape, (2, 92, 92, num_classes))

  def test_stage_resolutions(self):
    # Stem + ceil-mode pool: 730 -> 365 -> 183; layer2's stride (on its
    # first 1x1 conv) -> 92; layer3/4 dilate instead of striding.
    model = models.DeepLabV2(num_classes=16, depth=101)
    variables, x = _abstract_variables(model, (1, 730, 730, 3))
    _, state = jax.eval_shape(
        lambda v, i: model.apply(v, i, capture_intermediates=True,
                                 mutable=["intermediates"]), variables, x)
    inter = state["intermediates"]["backbone"]
    shape = lambda name: inter[name]["__call__"][0].shape
    self.assertEqual(shape("conv1")[1:3], (365, 365))
    self.assertEqual(shape("layer1_0")[1:], (183, 183, 256))
    self.assertEqual(shape("layer2_0")[1:], (92, 92, 512))
    self.assertEqual(shape("layer3_22")[1:], (92, 92, 1024))
    self.assertEqual(shape("layer4_2")[1:], (92, 92, 2048))
    conv = variables["params"]["backbone"]["layer2_0"]
    self.assertEqual(conv["conv1"]["kernel"].shape, (1, 1, 256, 128))
    # layer3's first block has a 1x1 shortcut (channels change), stride 1.
    self.assertIn("downsample_conv",
                  variables["params"]["backbone"]["layer3_0"])

  def test_head_has_no_bias_and_sums_four_branches(self):
    head = models.deeplab_v2.ASPPHead(num_classes=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 30, 30, 4)),
                    jnp.float32)
    params = head.init(jax.random.key(0), x)["params"]
    self.assertEqual(sorted(params), ["conv0", "conv1", "conv2", "conv3"])
    for branch in params.values():
      self.assertEqual(list(branch), ["kernel"])
    # Zeroing all branches but one leaves exactly that branch's output.
    out = head.apply({"params": params}, x)
    parts = []
    for keep in params:
      single = {k: (v if k == keep else jax.tree.map(jnp.zeros_like, v))
                for k, v in params.items()}
      parts.append(head.apply({"params": single}, x))
    np.testing.assert_allclose(out, sum(parts), rtol=1e-5, atol=1e-5)
    # Each branch is a 3x3 conv with dilation = padding = rate.
    for i, rate in enumerate((6, 12, 18, 24)):
      k = np.asarray(params[f"conv{i}"]["kernel"])
      expected = torch.nn.functional.conv2d(
          torch.from_numpy(np.moveaxis(np.array(x), -1, 1).copy()),
          torch.from_numpy(np.transpose(k, (3, 2, 0, 1)).copy()),
          padding=rate, dilation=rate).numpy()
      np.testing.assert_allclose(parts[i], np.moveaxis(expected, 1, -1),
                                 rtol=1e-4, atol=1e-4)

  def test_head_initialisation_matches_pytorch_default(self):
    # The release leaves its ASPP convs at torch's default Conv2d init:
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 9 * C_in
    # (docs/method.md, Network).
    c_in, classes = 256, 16
    x = jnp.zeros((1, 8, 8, c_in))
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(c_in, classes, 3, bias=False).weight.detach()
    ref = ref.numpy().astype(np.float64)
    bound = 1 / np.sqrt(9 * c_in)
    for init, std, limit in (("torch_default", ref.std(), bound),
                             ("normal_0.01", 0.01, None)):
      head = models.deeplab_v2.ASPPHead(num_classes=classes, initializer=init)
      params = head.init(jax.random.key(1), x)["params"]
      kernel = np.concatenate([np.ravel(p["kernel"]) for p in params.values()])
      self.assertLess(abs(kernel.std() / std - 1), 0.02, init)
      if limit is not None:
        self.assertLessEqual(np.abs(kernel).max(), limit)
        self.assertGreater(np.abs(kernel).max(), 0.99 * limit)
        self.assertAlmostEqual(abs(kernel.mean()) / std, 0, delta=0.02)
    config = default_config.get_config()
    self.assertEqual(models.get_model(config).head_init, "torch_default")
    with self.assertRaisesRegex(ValueError, "head_init='xavier'"):
      models.deeplab_v2.ASPPHead(num_classes=2, initializer="xavier").init(
          jax.random.key(0), jnp.zeros((1, 4, 4, 3)))

  def test_tiny_model_train_and_eval_modes(self):
    model = models.DeepLabV2(num_classes=5, depth=18, width=8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 41, 37, 3)),
                    jnp.float32)
    variables = model.init(jax.random.key(0), x)
    out, updates = model.apply(variables, x, train=True,
                               mutable=["batch_stats"])
    self.assertEqual(out["logits"].shape, (2, 6, 5, 5))
    self.assertEqual(out["features"].shape, (2, 6, 5, 64))
    before = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    after = updates["batch_stats"]["backbone"]["bn1"]["mean"]
    self.assertGreater(float(jnp.abs(after - before).max()), 0.0)
    # Eval mode is deterministic and uses the running statistics.
    e1 = model.apply(variables, x)
    e2 = model.apply({**variables, **updates}, x)
    self.assertGreater(float(jnp.abs(e1["logits"] - e2["logits"]).max()), 0)

  def test_get_model_from_config(self):
    config = default_config.get_config()
    config.model.depth = 18
    config.model.num_classes = 19
    model = models.get_model(config)
    self.assertIsInstance(model, models.DeepLabV2)
    self.assertEqual((model.depth, model.num_classes), (18, 19))
    config.model.name = "pspnet"
    with self.assertRaisesRegex(ValueError, "pspnet"):
      models.get_model(config)

  def test_bad_depth(self):
    with self.assertRaisesRegex(ValueError, "depth 42"):
      _abstract_variables(models.DeepLabV2(num_classes=2, depth=42),
                          (1, 32, 32, 3))


def _numpy_windows(x, kernel_size, stride, padding, dilation):
  """{(i, j): the (N, H', W', C) input pixels kernel tap (i, j) reads},
  plain NumPy on the padded input."""
  xp = np.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (xp.shape[1] - dilation * (kernel_size - 1) - 1) // stride + 1
  out_w = (xp.shape[2] - dilation * (kernel_size - 1) - 1) // stride + 1
  return {(i, j): xp[:, i * dilation:i * dilation + stride * (out_h - 1) + 1:
                     stride,
                     j * dilation:j * dilation + stride * (out_w - 1) + 1:
                     stride]
          for i in range(kernel_size) for j in range(kernel_size)}


def _numpy_conv(x, w, stride, padding, dilation):
  """Plain float64 convolution, NHWC x HWIO, by explicit window sums."""
  windows = _numpy_windows(x, w.shape[0], stride, padding, dilation)
  return sum(np.einsum("nhwc,co->nhwo", window, w[i, j])
             for (i, j), window in windows.items())


class CPUKernelsTest(parameterized.TestCase):
  """XLA:CPU's forms of the convolutions (docs/performance.md):
  the same values and gradients as the plain ones, the same variables."""

  @parameterized.parameters(
      # kernel, stride, dilation, C_in: the network's kinds (stem 7x7/2,
      # strided and plain 1x1, dilated 3x3) with both weight-gradient forms
      # (one product per tap; im2col for kh * kw * C_in <= PATCHES_MAX).
      (7, 2, 1, 3), (1, 2, 1, 5), (1, 1, 1, 200), (3, 1, 2, 4),
      (3, 1, 4, 120), (3, 2, 1, 2))
  def test_dot_weight_grad_matches_numpy_float64(self, k, stride, dilation,
                                                 c_in):
    rng = np.random.default_rng(k * 100 + c_in)
    x = rng.normal(size=(2, 9, 11, c_in))
    w = rng.normal(size=(k, k, c_in, 3))
    p = dilation * (k // 2)
    padding = ((p, p), (p, p))
    y_ref = _numpy_conv(x, w, stride, padding, dilation)
    g = rng.normal(size=y_ref.shape)
    # dW[i, j] = (the input pixels tap (i, j) reads)^T g, summed over
    # images and output pixels.
    dw_ref = np.zeros_like(w)
    for (i, j), window in _numpy_windows(x, k, stride, padding,
                                         dilation).items():
      dw_ref[i, j] = np.einsum("nhwa,nhwb->ab", window, g)
    # dx through <dx, v> = sum(g * conv(v, w)) for a random direction v
    # (the convolution is linear in x).
    v = rng.normal(size=x.shape)
    with jax.enable_x64(True):
      fn = lambda x, w: conv_lib.conv_dot_weight_grad(  # pylint: disable=g-long-lambda
          x, w, (stride, stride), padding, (dilation, dilation))
      y, vjp = jax.vjp(fn, jnp.asarray(x), jnp.asarray(w))
      dx, dw = vjp(jnp.asarray(g))
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        np.sum(np.asarray(dx) * v),
        np.sum(g * _numpy_conv(v, w, stride, padding, dilation)), rtol=1e-10)

  def test_pointwise_convs_are_matrix_products(self):
    # Stride-1 1x1 convolutions run forward and input gradient as products
    # (XLA:CPU's matrix kernels); strided 1x1 and 3x3 stay convolutions.
    x = jnp.ones((1, 6, 6, 8))

    def programs(k, stride):
      w = jnp.ones((k, k, 8, 4))
      pad = ((k // 2, k // 2),) * 2
      fn = lambda x, w: conv_lib.conv_dot_weight_grad(  # pylint: disable=g-long-lambda
          x, w, (stride, stride), pad, (1, 1))
      y, vjp = jax.vjp(fn, x, w)
      # Printed jaxprs include the custom VJP's inner programs.
      return str(jax.make_jaxpr(fn)(x, w)), str(jax.make_jaxpr(vjp)(y))

    for k, stride, as_products in ((1, 1, True), (1, 2, False),
                                   (3, 1, False)):
      for program in programs(k, stride):
        self.assertEqual("conv_general_dilated" not in program, as_products,
                         (k, stride, program))
        if as_products:
          self.assertIn("dot_general", program)

  def test_conv_module_has_nn_conv_variables(self):
    x = jnp.ones((1, 10, 10, 4))
    ours = conv_lib.Conv(6, (3, 3), padding=((2, 2), (2, 2)),
                         kernel_dilation=(2, 2), kernel_init=resnet.conv_init)
    flax_conv = nn.Conv(6, (3, 3), padding=[(2, 2), (2, 2)],
                        kernel_dilation=(2, 2), use_bias=False,
                        kernel_init=resnet.conv_init)
    a, b = ours.init(jax.random.key(3), x), flax_conv.init(
        jax.random.key(3), x)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_allclose(ours.apply(a, x), flax_conv.apply(b, x),
                               rtol=1e-6)

  @parameterized.parameters(18, 50)
  def test_every_backbone_conv_takes_the_dot_weight_gradient(self, depth):
    # R18 and R50 have 20 and 53 convolutions (stem, blocks, shortcuts).
    model = models.DeepLabV2(num_classes=3, depth=depth, width=8,
                             dot_weight_grads=True)
    x = jnp.zeros((1, 17, 17, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x))(variables)
    calls = [e for e in jaxpr.jaxpr.eqns if "custom_vjp" in e.primitive.name]
    self.assertLen(calls, {18: 20, 50: 53}[depth])

  @parameterized.parameters((41, 41), (9, 13), (5, 30))
  def test_aspp_products_equal_the_convolutions(self, h, w):
    # (9, 13) and (5, 30): the larger rates' off-centre taps fall entirely
    # outside the map and are left out of the products.
    x = np.random.default_rng(h).normal(size=(2, h, w, 7))
    with jax.enable_x64(True):
      conv = models.deeplab_v2.ASPPHead(5, dtype=jnp.float64)
      variables = conv.init(jax.random.key(1), jnp.asarray(x))

      def grads(head):
        fn = lambda v, x: jnp.sum(jnp.sin(head.apply(v, x)))  # pylint: disable=g-long-lambda
        return jax.value_and_grad(fn, (0, 1))(variables, jnp.asarray(x))
      v0, g0 = grads(conv)
      for form in ("product", "taps"):
        head = conv.clone(form=form)
        jax.tree.map(np.testing.assert_array_equal, variables,
                     head.init(jax.random.key(1), jnp.asarray(x)))
        v1, g1 = grads(head)
        np.testing.assert_allclose(v1, v0, rtol=1e-12, err_msg=form)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
          np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12,
                                     err_msg=form)
    with self.assertRaisesRegex(ValueError, "ASPPHead.form='dot'"):
      conv.clone(form="dot").init(jax.random.key(1), jnp.asarray(x))

  def test_forms_by_platform_follow_the_config(self):
    config = default_config.get_config()
    config.model.head_form, config.model.scan_blocks = "conv", "scan"
    built = models.get_model(config)
    self.assertEqual((built.head_form, built.scan_blocks), ("conv", True))
    config.model.head_form, config.model.scan_blocks = "taps", "unroll"
    built = models.get_model(config)
    self.assertEqual((built.head_form, built.scan_blocks), ("taps", False))
    config.model.head_form = "dots"
    with self.assertRaisesRegex(ValueError,
                                "config.model.head_form='dots'.*'conv'"):
      models.get_model(config)

  def test_network_with_cpu_kernels_equals_the_plain_one(self):
    # get_model leaves XLA:CPU's forms to the platform the network is
    # traced for (tests/aot_test.py checks the TPU and GPU programs); the
    # network's outputs, parameter gradients and BatchNorm statistics are
    # the plain network's (float64: to rounding).
    config = default_config.get_config()
    config.model.depth, config.model.width = 18, 8
    built = models.get_model(config)
    self.assertEqual((built.head_form, built.dot_weight_grads,
                      built.block_barrier), (None, None, None))
    x = np.random.default_rng(0).normal(size=(2, 33, 41, 3))
    with jax.enable_x64(True):
      plain = built.clone(dtype=jnp.float64, head_form="conv",
                          dot_weight_grads=False, block_barrier=False)
      fast = plain.clone(head_form="product", dot_weight_grads=True)
      variables = plain.init(jax.random.key(0), jnp.asarray(x))

      (v0, stats0), g0 = _train_loss_and_grads(plain, variables, x)
      (v1, stats1), g1 = _train_loss_and_grads(fast, variables, x)
    np.testing.assert_allclose(v1, v0, rtol=1e-10)
    for a, b in zip(jax.tree.leaves((g1, stats1)),
                    jax.tree.leaves((g0, stats0))):
      np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


class MaxPoolTest(parameterized.TestCase):

  @parameterized.parameters(365, 364, 7, 8, 10, 33)
  def test_matches_torch_ceil_mode(self, size):
    x = np.random.default_rng(size).normal(size=(1, size, size + 1, 2))
    ours = resnet.max_pool_ceil(jnp.asarray(x, jnp.float32))
    theirs = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)(
        torch.from_numpy(np.moveaxis(x, -1, 1)).float()).numpy()
    np.testing.assert_array_equal(ours, np.moveaxis(theirs, 1, -1))



class ScanBlocksTest(parameterized.TestCase):
  """scan_blocks (the accelerators' default) changes the program, not the
  results, the variables or their layout."""

  def test_scanned_blocks_equal_unrolled(self):
    with jax.enable_x64(True):
      self._check_equal("block")  # as shipped: each block rematerialised

  def _check_equal(self, remat):
    kwargs = dict(num_classes=3, depth=50, width=4, remat=remat,
                  dtype=jnp.float64)
    unrolled = models.DeepLabV2(scan_blocks=False, **kwargs)
    scanned = models.DeepLabV2(scan_blocks=True, **kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 17, 21, 3), jnp.float64)
    variables = unrolled.init(jax.random.key(0), x)
    self.assertEqual(jax.tree.structure(variables),
                     jax.tree.structure(scanned.init(jax.random.key(0), x)))
    (v0, stats0), g0 = _train_loss_and_grads(unrolled, variables, x)
    (v1, stats1), g1 = _train_loss_and_grads(scanned, variables, x)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    self.assertEqual(jax.tree.structure((g1, stats1)),
                     jax.tree.structure((g0, stats0)))
    for a, b in zip(jax.tree.leaves((g1, stats1)),
                    jax.tree.leaves((g0, stats0))):
      np.testing.assert_allclose(a, b, rtol=1e-9,
                                 atol=1e-9 * np.abs(b).max())
    # Every block after the first of a layer moved its statistics.
    moved = stats1["backbone"]["layer3_5"]["bn2"]["mean"]
    self.assertFalse(np.allclose(
        moved, variables["batch_stats"]["backbone"]["layer3_5"]["bn2"]
        ["mean"]))
    np.testing.assert_array_equal(scanned.apply(variables, x)["logits"],
                                  unrolled.apply(variables, x)["logits"])
    # One loop per layer in the forward pass (three to four blocks each).
    text = jax.jit(lambda v: scanned.apply(v, x)).lower(variables).as_text()
    self.assertEqual(text.count("stablehlo.while"), 4)


class RematTest(parameterized.TestCase):
  """config.model.remat changes memory, not results."""

  @parameterized.parameters(18, 50)
  @pytest.mark.slow
  def test_remat_modes_equal_none(self, depth):
    kwargs = dict(num_classes=5, depth=depth, width=8)
    plain = models.DeepLabV2(**kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 33, 41, 3))
    variables = plain.init(jax.random.key(0), x)
    (v0, stats0), g0 = _train_loss_and_grads(plain, variables, x)
    for mode in ("block", "block_keep_3x3"):
      with self.subTest(mode):
        remat = models.DeepLabV2(remat=mode, **kwargs)
        (v1, stats1), g1 = _train_loss_and_grads(remat, variables, x)
        np.testing.assert_allclose(v1, v0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves((g1, stats1)),
                        jax.tree.leaves((g0, stats0))):
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  @parameterized.parameters((50, "conv2"), (18, "conv1"))
  @pytest.mark.slow
  def test_what_each_mode_keeps_for_the_backward_pass(self, depth, kept):
    x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
    plain = models.DeepLabV2(num_classes=5, depth=depth, width=8)
    variables = jax.eval_shape(plain.init, jax.random.key(0), x)

    def saved(remat):
      model = plain.clone(remat=remat)

      def residuals(params, batch_stats, images):
        fn = lambda p: model.apply(  # pylint: disable=g-long-lambda
            {"params": p, "batch_stats": batch_stats}, images,
            train=True, mutable=["batch_stats"])[0]["logits"].sum()
        return jax.vjp(fn, params)[1]
      return _bytes(jax.eval_shape(residuals, variables["params"],
                                   variables["batch_stats"], x))

    def block_3x3_outputs(v, images):
      is_kept = lambda mdl, _: (  # pylint: disable=g-long-lambda
          mdl.name == kept and
          isinstance(mdl.parent, (resnet.Bottleneck, resnet.BasicBlock)))
      return plain.apply(v, images, train=True, capture_intermediates=is_kept,
                         mutable=["batch_stats", "intermediates"]
                         )[1]["intermediates"]

    none, block, keep = saved("none"), saved("block"), saved("block_keep_3x3")
    if depth == 50:
      self.assertLess(block, 0.5 * none)
    self.assertLess(keep, none)
    # Exactly the 3x3 outputs on top of "block": nothing more is kept, and
    # nothing of them is recomputed.
    outputs = _bytes(jax.eval_shape(block_3x3_outputs, variables, x))
    self.assertGreater(outputs, 0)
    self.assertEqual(keep - block, outputs)

  def test_bfloat16_network_keeps_no_float32_activations(self):
    model = models.DeepLabV2(num_classes=5, depth=18, width=8,
                             dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def residuals(params, batch_stats, images):
      fn = lambda p: model.apply(  # pylint: disable=g-long-lambda
          {"params": p, "batch_stats": batch_stats}, images,
          train=True, mutable=["batch_stats"])[0]["logits"].astype(
              jnp.float32).sum()
      return jax.vjp(fn, params)[1]

    leaves = jax.tree.leaves(jax.eval_shape(
        residuals, variables["params"], variables["batch_stats"], x))
    # Activations (>= the 8x8x... feature map of the last layer) are bfloat16
    # (or boolean ReLU masks); float32 only for parameters and statistics.
    activation_size = 8 * 8 * 8 * 8
    big_f32 = [r.shape for r in leaves
               if r.dtype == jnp.float32 and r.size >= activation_size and
               r.ndim == 4 and r.shape[0] == 1]
    self.assertEqual(big_f32, [])
    self.assertTrue(any(r.dtype == jnp.bfloat16 for r in leaves))

  def test_bad_remat_mode(self):
    model = models.DeepLabV2(num_classes=5, depth=18, width=8, remat="all")
    with self.assertRaisesRegex(ValueError, "remat='all'"):
      model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))

if __name__ == "__main__":
  absltest.main()
