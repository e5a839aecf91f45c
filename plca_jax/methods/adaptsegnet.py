"""AdaptSegNet (Tsai et al., CVPR 2018): multi-level output-space
adversarial learning on DeepLab-V2.

"Learning to Adapt Structured Output Space for Semantic Segmentation", as
the authors' `train_gta2cityscapes_multi.py` does it:

- the segmentation network has an auxiliary ASPP head on layer3 (same form
  as the main head); source loss = CE(main) + lambda_seg * CE(aux);
- one fully-convolutional discriminator per level (five 4x4 convs, stride
  2, padding 1, channels 64, 128, 256, 512, 1, leaky ReLU 0.2 between them)
  reads the softmax of the output upsampled to the input size;
- generator: the target outputs should fool the discriminators, BCE with
  logits against the source label (source = 0, target = 1 as the authors
  label them), weights lambda_adv (0.001 main, 0.0002 aux);
- discriminators: BCE on the detached source (label 0) and target
  (label 1) outputs, each half-weighted; their own Adam (lr 1e-4, betas
  0.9 / 0.99, poly decay);
- both in each step, the discriminators' gradients at the same parameters
  the generator's adversarial term saw (the authors step both optimizers
  at the end of the iteration).

Deviation: BatchNorm follows the project's treatment (batch statistics per
domain in training; docs/method.md, Network), where the authors' DeepLab
freezes the affine BatchNorm parameters.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from plca_jax import losses
from plca_jax import models
from plca_jax import optim
from plca_jax.methods import base

SOURCE_LABEL = 0.0  # the discriminator's label of source outputs
TARGET_LABEL = 1.0
LEVELS = {"discriminator": "logits", "aux_discriminator": "aux_logits"}


def torch_default_init(fan_in):
  """PyTorch's default conv init: kernel and bias U(+-1/sqrt(fan_in))."""
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class FCDiscriminator(nn.Module):
  """Output-space discriminator: (N, H, W, M) probabilities -> (N, H/32,
  W/32, 1) logits (each 4x4 / 2 conv halves the size, floor)."""
  channels: tuple[int, ...] = (64, 128, 256, 512)
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout
    for i, ch in enumerate((*self.channels, 1)):
      init = torch_default_init(16 * x.shape[-1])
      x = nn.Conv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=init, bias_init=init, name=f"conv{i}")(x)
      if i < len(self.channels):
        x = nn.leaky_relu(x, self.negative_slope)
    return x


def bce_with_logits(logits, label):
  """Mean binary cross-entropy of logits against a constant label."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(
      logits, jnp.full_like(logits, label)))


def _probs(out, key, size):
  logits = losses.at_least_f32(out[key])
  return jax.nn.softmax(losses.upsample_bilinear(logits, size), axis=-1)


def generator_loss(params, batch_stats, micro, disc_params, *, model,
                   discriminator, config, block, levels):
  """Segmentation + adversarial loss of one micro-batch.

  Returns:
    (total, (terms, new batch_stats, {level: (source probs, target
    probs)} stop-gradient, for the discriminators' update)).
  """
  out_s, out_t, batch_stats = base.forward_pair(model, params, batch_stats,
                                               micro, config)
  labels = base.labels_of(micro, "source")
  size = labels.shape[1:3]
  ignore = config.loss.ignore_label
  terms, probs, total = {}, {}, 0.0
  for level in levels:
    key = LEVELS[level]
    up = losses.upsample_bilinear(losses.at_least_f32(out_s[key]), size)
    prefix = "" if level == "discriminator" else "aux_"
    terms[f"{prefix}ce"] = losses.cross_entropy(up, labels, ignore)
    p_t = _probs(out_t, key, micro["target"]["image"].shape[1:3])
    terms[f"{prefix}adv"] = bce_with_logits(
        discriminator.apply({"params": disc_params[level]}, p_t),
        SOURCE_LABEL)
    seg_w, adv_w = ((1.0, block.lambda_adv) if not prefix else
                    (block.lambda_seg, block.lambda_adv_aux))
    total = total + seg_w * terms[f"{prefix}ce"] + adv_w * terms[
        f"{prefix}adv"]
    probs[level] = jax.lax.stop_gradient(
        (jax.nn.softmax(up, axis=-1), p_t))
  return total, (terms, batch_stats, probs)


def discriminator_loss(disc_params, probs_s, probs_t, *, discriminator):
  """BCE on source outputs (label 0) and target outputs (label 1), / 2."""
  def d(p):
    return discriminator.apply({"params": disc_params}, p)
  return 0.5 * (bce_with_logits(d(probs_s), SOURCE_LABEL) +
                bce_with_logits(d(probs_t), TARGET_LABEL))


class AdaptSegNet(base.Method):
  """Output-space adversarial adaptation; `config.adaptsegnet`."""

  name = "adaptsegnet"

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        multi_level=True,  # auxiliary head + discriminator on layer3
        lambda_seg=0.1,  # weight of the auxiliary head's CE
        lambda_adv=0.001,  # adversarial weight, main output
        lambda_adv_aux=0.0002,  # adversarial weight, auxiliary output
        disc_channels=(64, 128, 256, 512),
        disc_lr=1e-4,  # Adam, poly-decayed over config.optim.schedule_steps
        disc_b1=0.9,
        disc_b2=0.99,
    ))

  def __init__(self, config):
    super().__init__(config)
    self.levels = tuple(LEVELS)[:2 if self.block.multi_level else 1]
    self.discriminator = FCDiscriminator(tuple(self.block.disc_channels))

  def batch_fields(self, domain):
    return ("image", "label") if domain == "source" else ("image",)

  def create_model(self):
    return models.get_model(self.config).clone(
        aux_head=self.config.adaptsegnet.multi_level)

  def extra_networks(self):
    example = jnp.zeros((1, *self.config.data.crop_size,
                         self.config.model.num_classes))
    return {level: (self.discriminator, (example,)) for level in self.levels}

  def _disc_optimizer(self):
    return optim.adam_poly(self.block.disc_lr,
                           self.config.optim.schedule_steps,
                           self.config.optim.poly_power, self.block.disc_b1,
                           self.block.disc_b2)

  def create_optimizer(self, tree):
    if tree in self.levels:
      return self._disc_optimizer()[0]
    return super().create_optimizer(tree)

  def learning_rates(self, step):
    return {**super().learning_rates(step),
            "discriminator_learning_rate": self._disc_optimizer()[1](step)}

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, step, phase
    seg = variables[base.SEGMENTATION]
    disc_params = {level: variables[level]["params"] for level in self.levels}
    g_fn = jax.value_and_grad(functools.partial(
        generator_loss, model=self.model, discriminator=self.discriminator,
        config=self.config, block=self.block, levels=self.levels),
                              has_aux=True)
    (loss, (terms, batch_stats, probs)), seg_grads = g_fn(
        seg["params"], seg["batch_stats"], micro, disc_params)
    grads = {base.SEGMENTATION: seg_grads}
    d_fn = jax.value_and_grad(functools.partial(
        discriminator_loss, discriminator=self.discriminator))
    for level in self.levels:
      prefix = "" if level == "discriminator" else "aux_"
      terms[f"{prefix}d_loss"], grads[level] = d_fn(disc_params[level],
                                                     *probs[level])
    return (grads, {base.SEGMENTATION: batch_stats},
            {"loss": loss, **terms})
