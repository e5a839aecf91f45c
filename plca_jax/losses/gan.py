"""Losses of GAN-based methods (LDR): least-squares GAN, feature matching,
L1 reconstruction / cycle terms, a perceptual term (and the unit
normalisation of its features), confident pseudo-labels.

Conventions as CycleGAN's and pix2pixHD's code: the least-squares GAN loss
(Mao et al. 2017) is mean((D(x) - 1)^2) for "real" and mean(D(x)^2) for
"fake"; with several discriminators (a multi-scale one) their losses are
summed; feature matching is pix2pixHD's
  sum_k sum_{i < last} (1 / num_scales) (4 / (num_layers + 1))
      mean|D_k^i(fake) - D_k^i(real)|
with the real features held fixed (no gradient).
"""

import jax
import jax.numpy as jnp


def lsgan_loss(logits, real):
  """mean((logits - 1)^2) if `real` else mean(logits^2)."""
  logits = logits.astype(jnp.float32)
  target = 1.0 if real else 0.0
  return jnp.mean(jnp.square(logits - target))


def multiscale_lsgan_loss(outputs, real):
  """Sum over discriminators of `lsgan_loss` of each one's last output.

  `outputs` is a list (per discriminator) of lists of layer outputs, as
  `models.gan.MultiScaleDiscriminator` returns."""
  return sum(lsgan_loss(layers[-1], real) for layers in outputs)


def feature_matching_loss(fake_outputs, real_outputs):
  """pix2pixHD's discriminator feature matching (module doc); the real
  features are detached here."""
  num_scales = len(fake_outputs)
  total = 0.0
  for fake, real in zip(fake_outputs, real_outputs):
    num_layers = len(fake) - 1  # the layers before the logits
    weight = (1.0 / num_scales) * (4.0 / (num_layers + 1))
    for f, r in zip(fake[:-1], real[:-1]):
      total = total + weight * jnp.mean(jnp.abs(
          f.astype(jnp.float32) - jax.lax.stop_gradient(r.astype(
              jnp.float32))))
  return total


def l1_loss(x, y):
  """mean |x - y| (cycle consistency, pixel reconstruction)."""
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))


def perceptual_loss(fake_features, real_features, weights=None):
  """sum_i w_i mean|phi_i(fake) - phi_i(real)|, the real features detached
  (pix2pixHD's VGG loss form; the feature extractor is the caller's)."""
  if weights is None:
    weights = [1.0] * len(fake_features)
  return sum(w * l1_loss(f, jax.lax.stop_gradient(r))
             for w, f, r in zip(weights, fake_features, real_features))


def unit_normalize(features, epsilon=1e-10):
  """(..., C) -> each vector divided by its L2 norm over C (+ epsilon), in
  float32; mean |a - b| of two such is at most 2."""
  features = features.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / (norm + epsilon)


def confident_pseudo_labels(logits, threshold, ignore_label=255):
  """Self-training labels: argmax where the softmax maximum is at least
  `threshold`, else `ignore_label`; no gradient. (N, H, W, M) -> (N, H, W)
  int32."""
  probs = jax.nn.softmax(jax.lax.stop_gradient(logits.astype(jnp.float32)),
                         axis=-1)
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  return jnp.where(jnp.max(probs, axis=-1) >= threshold, labels,
                   ignore_label)


def soft_label_map(logits, temperature):
  """softmax(logits / temperature): the label map a reconstruction network
  reads (a lower temperature is closer to one-hot)."""
  return jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)


@jax.custom_vjp
def scale_gradient(x, scale):
  """Identity forward; the backward multiplies the cotangent by `scale`."""
  return x


def _scale_fwd(x, scale):
  return x, scale


def _scale_bwd(scale, g):
  return g * scale, jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_fwd, _scale_bwd)
