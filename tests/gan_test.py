"""Tests of the GAN networks and losses of LDR (plca_jax/models/gan.py,
plca_jax/losses/gan.py): the networks against PyTorch ports of CycleGAN's /
pix2pixHD's modules with the same weights, the losses against plain NumPy
float64 implementations (values and gradients)."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from plca_jax.losses import gan as gan_losses
from plca_jax.models import gan


def _rng(seed=0):
  return np.random.default_rng(seed)


def _nchw(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x, np.float32), -1, 1)
                          .copy())


def _nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


def _conv(params, torch_conv):
  """Copies a flax Conv's (kh, kw, in, out) kernel and bias into torch."""
  torch_conv.weight.data = torch.from_numpy(np.transpose(
      np.asarray(params["kernel"]), (3, 2, 0, 1)).copy())
  torch_conv.bias.data = torch.from_numpy(np.asarray(params["bias"]).copy())
  return torch_conv


def _conv_transpose(params, torch_conv):
  """flax ConvTranspose (no kernel transpose) -> torch ConvTranspose2d:
  torch's is the gradient of a convolution, i.e. a dilated convolution
  with the kernel flipped and in/out swapped."""
  k = np.asarray(params["kernel"])[::-1, ::-1]  # (kh, kw, in, out)
  torch_conv.weight.data = torch.from_numpy(np.transpose(k, (2, 3, 0, 1))
                                            .copy())
  torch_conv.bias.data = torch.from_numpy(np.asarray(params["bias"]).copy())
  return torch_conv


def _torch_generator(params, num_blocks):
  """CycleGAN's ResnetGenerator (instance norm without affine parameters,
  no dropout, biases on), with the flax parameters."""

  class InstanceNorm(nn.Module):  # nn.InstanceNorm2d(C, affine=False)

    def forward(self, x):
      return nn.functional.instance_norm(x)

  norm = InstanceNorm
  layers = [nn.ReflectionPad2d(3),
            _conv(params["stem"], nn.Conv2d(1, 1, 7)), norm(), nn.ReLU()]
  for i in range(2):
    layers += [_conv(params[f"down{i}"], nn.Conv2d(1, 1, 3, 2, 1)), norm(),
               nn.ReLU()]

  class Block(nn.Module):

    def __init__(self, p):
      super().__init__()
      self.body = nn.Sequential(
          nn.ReflectionPad2d(1), _conv(p["Conv_0"], nn.Conv2d(1, 1, 3)),
          norm(), nn.ReLU(), nn.ReflectionPad2d(1),
          _conv(p["Conv_1"], nn.Conv2d(1, 1, 3)), norm())

    def forward(self, x):
      return x + self.body(x)

  layers += [Block(params[f"block{i}"]) for i in range(num_blocks)]
  for i in range(2):
    layers += [_conv_transpose(params[f"up{i}"], nn.ConvTranspose2d(
        1, 1, 3, stride=2, padding=1, output_padding=1)), norm(), nn.ReLU()]
  layers += [nn.ReflectionPad2d(3), _conv(params["head"], nn.Conv2d(1, 1, 7)),
             nn.Tanh()]
  return nn.Sequential(*layers)


def _torch_patch_outputs(params, x, num_layers):
  """pix2pixHD's NLayerDiscriminator (getIntermFeat) layer by layer."""
  outputs = []
  for i in range(num_layers + 2):
    stride = 2 if i < num_layers else 1
    x = _conv(params[f"conv{i}"], nn.Conv2d(1, 1, 4, stride, 1))(x)
    if i < num_layers + 1:
      if i > 0:
        x = nn.functional.instance_norm(x)
      x = nn.functional.leaky_relu(x, 0.2)
    outputs.append(x)
  return outputs


class NetworksTest(absltest.TestCase):

  def test_instance_norm_and_downsample_match_torch(self):
    x = _rng().normal(size=(2, 7, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(
        gan.instance_norm(jnp.asarray(x)),
        _nhwc(nn.functional.instance_norm(_nchw(x))), atol=1e-5)
    np.testing.assert_allclose(
        gan.downsample(jnp.asarray(x)),
        _nhwc(nn.functional.avg_pool2d(_nchw(x), 3, 2, 1,
                                       count_include_pad=False)), atol=1e-6)

  def test_generator_matches_cyclegans_resnet_generator(self):
    net = gan.ResnetGenerator(channels=4, num_blocks=2)
    x = _rng(1).uniform(-1, 1, size=(2, 16, 20, 3)).astype(np.float32)
    params = net.init(jax.random.key(0), jnp.asarray(x))["params"]
    out = net.apply({"params": params}, jnp.asarray(x))
    self.assertEqual(out.shape, (2, 16, 20, 3))
    np.testing.assert_allclose(
        out, _nhwc(_torch_generator(params, 2)(_nchw(x))), atol=2e-5)

  def test_generator_takes_sizes_not_divisible_by_four(self):
    net = gan.ResnetGenerator(channels=2, num_blocks=1, out_channels=5)
    x = jnp.asarray(_rng(2).uniform(-1, 1, size=(1, 13, 18, 7)), jnp.float32)
    params = net.init(jax.random.key(0), x)
    out = net.apply(params, x)
    self.assertEqual(out.shape, (1, 13, 18, 5))
    self.assertLessEqual(float(jnp.abs(out).max()), 1.0)
    # What it computes on the reflection-padded input, cropped back.
    padded = jnp.pad(x, ((0, 0), (0, 3), (0, 2), (0, 0)), mode="reflect")
    np.testing.assert_allclose(out, net.apply(params, padded)[:, :13, :18],
                               atol=1e-6)

  def test_discriminators_match_pix2pixhds(self):
    x = _rng(3).normal(size=(2, 32, 40, 5)).astype(np.float32)
    net = gan.MultiScaleDiscriminator(channels=4, num_layers=2, num_scales=2)
    params = net.init(jax.random.key(0), jnp.asarray(x))["params"]
    outputs = net.apply({"params": params}, jnp.asarray(x))
    self.assertLen(outputs, 2)
    # Scale k sees the input average-pooled k times.
    inputs = [_nchw(x), nn.functional.avg_pool2d(
        _nchw(x), 3, 2, 1, count_include_pad=False)]
    for k in range(2):
      expected = _torch_patch_outputs(params[f"scale{k}"], inputs[k], 2)
      self.assertLen(outputs[k], 4)
      for got, want in zip(outputs[k], expected):
        np.testing.assert_allclose(got, _nhwc(want), rtol=1e-4, atol=1e-5)
    # 32 -> 16 -> 8 -> 7 -> 6 (4x4 convs, padding 1: stride 2, 2, 1, 1).
    self.assertEqual(outputs[0][-1].shape, (2, 6, 8, 1))
    self.assertEqual(outputs[0][1].shape[-1], 8)  # 4 x min(2^i, 8) wide


def _np_feature_matching(fake, real):
  total = 0.0
  for f_layers, r_layers in zip(fake, real):
    w = (1 / len(fake)) * (4 / len(f_layers))
    for f, r in zip(f_layers[:-1], r_layers[:-1]):
      total += w * np.mean(np.abs(np.float64(f) - np.float64(r)))
  return total


class LossesTest(absltest.TestCase):

  def test_least_squares_losses(self):
    rng = _rng(4)
    logits = [rng.normal(size=(2, 3, 4, 1)) for _ in range(2)]
    for real, target in ((True, 1.0), (False, 0.0)):
      self.assertAlmostEqual(
          float(gan_losses.lsgan_loss(jnp.asarray(logits[0]), real)),
          np.mean((logits[0] - target)**2), places=5)
      multi = [[rng.normal(size=(1, 2)), l] for l in logits]
      self.assertAlmostEqual(
          float(gan_losses.multiscale_lsgan_loss(
              jax.tree.map(jnp.asarray, multi), real)),
          sum(np.mean((l - target)**2) for l in logits), places=5)

  def test_feature_matching_value_and_gradients(self):
    rng = _rng(5)
    shapes = [(1, 6, 6, 4), (1, 3, 3, 8), (1, 2, 2, 1)]
    fake = [[rng.normal(size=s) for s in shapes] for _ in range(2)]
    real = [[rng.normal(size=s) for s in shapes] for _ in range(2)]
    as_jnp = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    value, (g_fake, g_real) = jax.value_and_grad(
        gan_losses.feature_matching_loss, argnums=(0, 1))(as_jnp(fake),
                                                          as_jnp(real))
    self.assertAlmostEqual(float(value), _np_feature_matching(fake, real),
                           places=5)
    for k in range(2):
      w = (1 / 2) * (4 / 3)
      for i, s in enumerate(shapes):
        if i == len(shapes) - 1:  # the logits take no part
          np.testing.assert_array_equal(g_fake[k][i], 0.0)
        else:
          np.testing.assert_allclose(
              g_fake[k][i], w * np.sign(fake[k][i] - real[k][i]) /
              np.prod(s), rtol=1e-5)
        np.testing.assert_array_equal(g_real[k][i], 0.0)  # held fixed

  def test_l1_and_perceptual(self):
    rng = _rng(6)
    a, b, c, d = (rng.normal(size=(2, 5, 3)) for _ in range(4))
    self.assertAlmostEqual(float(gan_losses.l1_loss(jnp.asarray(a),
                                                    jnp.asarray(b))),
                           np.mean(np.abs(a - b)), places=5)
    value, grads = jax.value_and_grad(
        lambda r: gan_losses.perceptual_loss(
            [jnp.asarray(a), jnp.asarray(c)], r, weights=[0.5, 2.0]))(
                [jnp.asarray(b), jnp.asarray(d)])
    self.assertAlmostEqual(float(value), 0.5 * np.mean(np.abs(a - b)) +
                           2.0 * np.mean(np.abs(c - d)), places=5)
    for g in grads:
      np.testing.assert_array_equal(g, 0.0)  # the real side is detached

  def test_unit_normalize(self):
    f = _rng(9).normal(size=(2, 3, 5)) * 100.0
    f[0, 0] = 0.0  # a zero vector stays zero
    got = np.asarray(gan_losses.unit_normalize(jnp.asarray(f, jnp.float32)))
    norm = np.sqrt(np.sum(f**2, -1, keepdims=True))
    np.testing.assert_allclose(got, f / np.where(norm > 0, norm, 1.0),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got[1], axis=-1), 1.0,
                               rtol=1e-5)

  def test_confident_pseudo_labels_and_soft_label_map(self):
    logits = np.array([[[[4.0, 0.0, 0.0], [1.0, 1.2, 0.9]],
                        [[0.0, 0.0, 9.0], [2.0, 2.0, -3.0]]]])
    labels = gan_losses.confident_pseudo_labels(jnp.asarray(logits), 0.9, 255)
    np.testing.assert_array_equal(labels, [[[0, 255], [2, 255]]])
    for t in (0.5, 2.0):
      e = np.exp(logits / t - np.max(logits / t, -1, keepdims=True))
      np.testing.assert_allclose(
          gan_losses.soft_label_map(jnp.asarray(logits), t),
          e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)

  def test_scale_gradient(self):
    x = jnp.asarray(_rng(7).normal(size=(3, 4)), jnp.float32)
    w = jnp.asarray(_rng(8).normal(size=(3, 4)), jnp.float32)
    f = lambda x: jnp.sum(gan_losses.scale_gradient(x, 0.25) * w)
    np.testing.assert_allclose(f(x), jnp.sum(x * w), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(x), 0.25 * w, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
