"""FDA (Yang & Soatto, CVPR 2020): Fourier domain adaptation.

"FDA: Fourier Domain Adaptation for Semantic Segmentation", as the authors'
training code (`train.py`, `utils/__init__.py`) does it:

- each source image takes the target image's low-frequency amplitude
  (`spectral_transfer`, on 0-255 images before the mean is subtracted);
- CE on the stylised source; on the target the robust (Charbonnier)
  entropy of the stride-8 softmax (`robust_entropy`), weight 0.005, from
  `entropy_start_step` on;
- with `pseudo_label_dir` (written by the MBT tool,
  `python -m plca_jax.methods.mbt`), the self-training round: also CE on the
  pseudo-labelled target (the batch field "pseudo_label", read on the host
  and augmented with the image).

Deviation: BatchNorm follows the project's treatment (batch statistics per
domain in training; docs/method.md, Network); the authors' DeepLab freezes it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections

from plca_jax import losses
from plca_jax.methods import base
from plca_jax.methods import pseudo_labels

BETAS = (0.01, 0.05, 0.09)  # the paper's three models, averaged by MBT


def spectral_transfer(source, target, beta):
  """Source images with the target's low-frequency amplitude.

  Per image pair and channel: the 2-D FFT amplitude of the source is
  replaced by the target's in the four corner blocks [0:b, 0:b],
  [0:b, W-b:W], [H-b:H, 0:b], [H-b:H, W-b:W] of the unshifted spectrum,
  b = floor(min(H, W) * beta); the source's phase is kept; inverse FFT,
  real part. (The convention of the authors' training code, not of their
  centred NumPy demo.)

  Args:
    source: float (N, H, W, C) images, 0-255 (before mean subtraction).
    target: float (N, H, W, C) images of the same shape.
    beta: the block size as a fraction of min(H, W); 0 returns `source`.

  Returns:
    float32 (N, H, W, C) (float64 for float64 input); not clipped.
  """
  if source.shape != target.shape:
    raise ValueError(f"source {source.shape} and target {target.shape} "
                     "images must have the same shape")
  h, w = source.shape[1:3]
  b = int(math.floor(min(h, w) * beta))
  source = losses.at_least_f32(source)
  if b == 0:
    return source
  target = target.astype(source.dtype)
  f_s = jnp.fft.fft2(source, axes=(1, 2))
  f_t = jnp.fft.fft2(target, axes=(1, 2))
  rows = (jnp.arange(h) < b) | (jnp.arange(h) >= h - b)
  cols = (jnp.arange(w) < b) | (jnp.arange(w) >= w - b)
  corner = (rows[:, None] & cols[None, :])[None, :, :, None]
  amplitude = jnp.where(corner, jnp.abs(f_t), jnp.abs(f_s))
  mixed = amplitude * jnp.exp(1j * jnp.angle(f_s))
  return jnp.real(jnp.fft.ifft2(mixed, axes=(1, 2))).astype(source.dtype)


def robust_entropy(logits, eta=2.0):
  """FDA's Charbonnier entropy: mean over pixels of (ent^2 + 1e-8)^eta.

  ent is the per-pixel entropy of softmax(logits) over the last axis,
  divided by log(num_classes).
  """
  logits = losses.at_least_f32(logits)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  ent = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1) / math.log(
      logits.shape[-1])
  return jnp.mean((ent**2 + 1e-8)**eta)


def ce_and_entropy(model, params, batch_stats, inputs_s, images_t, micro,
                   config, eta):
  """CE of the source labels on `inputs_s` (0-255 RGB, e.g. stylised) and
  the robust entropy of the target images: ({"ce", "entropy"}, target
  outputs, new batch_stats); source, then target through the network."""
  out_s, batch_stats = base.forward(model, params, batch_stats,
                                    base.encode(inputs_s, config))
  out_t, batch_stats = base.forward(model, params, batch_stats,
                                    base.encode(images_t, config))
  labels = base.labels_of(micro, "source")
  logits_s = losses.at_least_f32(out_s["logits"])
  terms = {"ce": losses.cross_entropy(
      losses.upsample_bilinear(logits_s, labels.shape[1:3]), labels,
      config.loss.ignore_label)}
  terms["entropy"] = robust_entropy(out_t["logits"], eta)
  return terms, out_t, batch_stats


def fda_loss(params, batch_stats, micro, step, *, model, config, block):
  """One micro-batch: (total, (terms, new batch_stats))."""
  images_s = micro["source"]["image"].astype(jnp.float32)
  images_t = micro["target"]["image"].astype(jnp.float32)
  stylised = spectral_transfer(images_s, images_t, block.beta)
  terms, out_t, batch_stats = ce_and_entropy(
      model, params, batch_stats, stylised, images_t, micro, config,
      block.eta)
  ignore = config.loss.ignore_label
  on = (step >= block.entropy_start_step).astype(jnp.float32)
  total = terms["ce"] + on * block.entropy_weight * terms["entropy"]
  if block.pseudo_label_dir:
    pseudo = base.labels_of(micro, "target", pseudo_labels.FIELD)
    logits_t = losses.at_least_f32(out_t["logits"])
    terms["pseudo_ce"] = losses.cross_entropy(
        losses.upsample_bilinear(logits_t, pseudo.shape[1:3]), pseudo, ignore)
    total = total + block.pseudo_label_weight * terms["pseudo_ce"]
  return total, (terms, batch_stats)


class FDA(pseudo_labels.TargetPseudoLabels, base.Method):
  """Fourier domain adaptation (+ MBT self-training); `config.fda`."""

  name = "fda"

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        beta=0.01,  # the paper trains 0.01, 0.05 and 0.09 (BETAS)
        entropy_weight=0.005,
        eta=2.0,  # the Charbonnier exponent ("ita" in the authors' code)
        entropy_start_step=0,  # the authors' --switch2entropy
        # Self-training round: a directory written by
        # `python -m plca_jax.methods.mbt`; "" = off.
        pseudo_label_dir="",
        pseudo_label_weight=1.0,
    ))

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, phase
    return base.segmentation_grads(functools.partial(
        fda_loss, model=self.model, config=self.config, block=self.block),
                                   variables, micro, step)
