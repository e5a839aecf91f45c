"""Image-to-image networks for GAN-based methods (LDR): generators and
PatchGAN discriminators.

- `ResnetGenerator`: CycleGAN's / pix2pixHD's global generator (Zhu et al.
  2017; Johnson et al. 2016): 7x7 conv, two stride-2 3x3 convs, residual
  blocks, two stride-2 transposed convs, 7x7 conv, tanh; instance norm
  (no affine parameters, as CycleGAN's default) and reflection padding.
  Inputs whose size is not a multiple of 4 are reflection-padded and the
  output cropped back, so any image size works (730x1460 included).
- `PatchDiscriminator`: the 70x70 PatchGAN (4x4 convs; stride 2 for the
  first `num_layers`, then stride 1; instance norm after all but the first;
  leaky ReLU 0.2), returning every layer's output so that feature matching
  can read them.
- `MultiScaleDiscriminator`: pix2pixHD's `num_scales` PatchGANs, the k-th on
  the input average-pooled k times (3x3, stride 2, padding 1, padding not
  counted).

Images are float in [-1, 1] (`to_unit_range` / `from_unit_range`).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def to_unit_range(images):
  """0-255 images -> [-1, 1] float32."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def from_unit_range(images):
  """[-1, 1] -> 0-255 float32 (clipped)."""
  return jnp.clip((images + 1.0) * 127.5, 0.0, 255.0)


def instance_norm(x, epsilon=1e-5):
  """Per image and channel over H, W: (x - mean) / sqrt(var + eps); no
  affine parameters (PyTorch's InstanceNorm2d default)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + epsilon)


def reflect_pad(x, pad):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


class ResidualBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3), padding="VALID")(reflect_pad(x, 1))
    y = nn.relu(instance_norm(y))
    y = nn.Conv(self.channels, (3, 3), padding="VALID")(reflect_pad(y, 1))
    return x + instance_norm(y)


class ResnetGenerator(nn.Module):
  """(N, H, W, C_in) -> (N, H, W, out_channels) in [-1, 1]."""
  channels: int = 64  # ngf
  num_blocks: int = 9
  out_channels: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # instance norm only: no batch statistics
    h, w = x.shape[1:3]
    ph, pw = -h % 4, -w % 4
    if ph or pw:
      x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    c = self.channels
    x = nn.Conv(c, (7, 7), padding="VALID", name="stem")(reflect_pad(x, 3))
    x = nn.relu(instance_norm(x))
    for i in range(2):
      x = nn.Conv(c * 2**(i + 1), (3, 3), strides=(2, 2),
                  padding=((1, 1), (1, 1)), name=f"down{i}")(x)
      x = nn.relu(instance_norm(x))
    for i in range(self.num_blocks):
      x = ResidualBlock(c * 4, name=f"block{i}")(x)
    for i in range(2):
      # PyTorch's ConvTranspose2d(3, stride 2, padding 1, output_padding 1):
      # on the 2x-dilated input, k - 1 - 1 = 1 before and 1 + 1 = 2 after
      # ("SAME" pads 2 / 1 here: the output one pixel shifted). Its kernel
      # is torch's flipped (tests/gan_test.py).
      x = nn.ConvTranspose(c * 2**(1 - i), (3, 3), strides=(2, 2),
                           padding=((1, 2), (1, 2)), name=f"up{i}")(x)
      x = nn.relu(instance_norm(x))
    x = nn.Conv(self.out_channels, (7, 7), padding="VALID",
                name="head")(reflect_pad(x, 3))
    return jnp.tanh(x)[:, :h, :w]


class PatchDiscriminator(nn.Module):
  """(N, H, W, C) -> list of every layer's output; the last is the
  (N, h, w, 1) real/fake logits map."""
  channels: int = 64  # ndf
  num_layers: int = 3
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    outputs = []
    widths = [self.channels * min(2**i, 8)
              for i in range(self.num_layers + 1)] + [1]
    for i, width in enumerate(widths):
      stride = 2 if i < self.num_layers else 1
      x = nn.Conv(width, (4, 4), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), name=f"conv{i}")(x)
      if i < len(widths) - 1:
        if i > 0:
          x = instance_norm(x)
        x = nn.leaky_relu(x, self.negative_slope)
      outputs.append(x)
    return outputs


def downsample(x):
  """3x3 average pool, stride 2, padding 1, padding not counted."""
  window, strides = (1, 3, 3, 1), (1, 2, 2, 1)
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(jnp.ones_like(x[..., :1]), 0.0, jax.lax.add,
                                window, strides, pad)
  return total / count


class MultiScaleDiscriminator(nn.Module):
  """`num_scales` PatchGANs: list (per scale) of lists of layer outputs."""
  channels: int = 64
  num_layers: int = 3
  num_scales: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    outputs: list[Sequence[jax.Array]] = []
    for k in range(self.num_scales):
      if k:
        x = downsample(x)
      outputs.append(PatchDiscriminator(self.channels, self.num_layers,
                                        name=f"scale{k}")(x, train))
    return outputs
