"""LDR (Yang et al., ECCV 2020): label-driven reconstruction.

"Label-Driven Reconstruction for Domain Adaptation in Semantic
Segmentation". One run trains it in two phases (one command:
`configs/ldr.py`):

1. Phase 0, updates 1..`translation_steps`: the target -> source
   translation network G (and the source -> target network F it is
   trained with, unpaired, CycleGAN-style): least-squares adversarial
   terms against two PatchGAN image discriminators, one per domain, plus
   the cycle terms lambda_cycle (|F(G(x_t)) - x_t|_1 + |G(F(x_s)) - x_s|_1).
2. Phase 1, the updates after: with G fixed, the segmentation network on
   source images (CE with their labels) and on translated target images
   G(x_t) (CE with self-supervised pseudo-labels: the network's own
   prediction where its softmax maximum is >= `pseudo_threshold`);
   output-space adversarial alignment of the translated target's softmax
   to the source's (an AdaptSegNet discriminator, BCE, weight lambda_adv);
   and a reconstruction network R that rebuilds each input image (source
   and translated target) from its predicted label map
   softmax(logits / temperature), trained as a conditional GAN
   (pix2pixHD): multi-scale PatchGAN discriminators on (label map, image),
   least-squares adversarial + lambda_fm x feature
   matching + lambda_perceptual x perceptual loss. The reconstruction loss
   also back-propagates into the segmentation network through the label
   map, weighted lambda_recon.

Evaluation follows the method: target images are translated by G before
segmentation (`translate_at_eval`; `eval_model`).

Deviations and choices, all said in docs/method.md:
- The perceptual loss uses the segmentation network's own layer4 features
  (eval mode, its parameters held fixed in that term) instead of an
  ImageNet VGG-19, which cannot be downloaded here.
- Pseudo-labels are computed online from the current network (thresholded
  softmax) rather than in offline self-training rounds.
- No image history buffer for the translation discriminators (CycleGAN
  keeps 50 past fakes) and no identity term; instance norm without affine
  parameters.
- The weights lambda_recon, temperature and pseudo_threshold are this
  project's choices (the authors' code cannot be read here); the GAN
  settings (Adam 2e-4, betas 0.5 / 0.999, lambda_cycle 10, lambda_fm 10,
  lambda_perceptual 10, LSGAN) are CycleGAN's and pix2pixHD's defaults.
- The networks of each phase stay fixed outside it (no update at all: no
  weight decay, no momentum); every schedule counts its own phase's
  updates.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from plca_jax import losses
from plca_jax import optim
from plca_jax.data import transforms
from plca_jax.losses import gan as gan_losses
from plca_jax.methods import adaptsegnet
from plca_jax.methods import base
from plca_jax.models import gan

TRANSLATOR = "translator_ts"  # target -> source, the one used afterwards
BACK_TRANSLATOR = "translator_st"  # source -> target, for the cycle
IMAGE_DISCS = {"source": "image_disc_source", "target": "image_disc_target"}
RECONSTRUCTOR = "reconstructor"
RECON_DISC = "reconstruction_disc"
OUTPUT_DISC = "output_disc"
TRANSLATION_TREES = (TRANSLATOR, BACK_TRANSLATOR, *IMAGE_DISCS.values())
ADAPTATION_TREES = (RECONSTRUCTOR, RECON_DISC, OUTPUT_DISC)
TRANSLATION_SCALARS = ("translation_loss", "translation_adv", "cycle",
                       "image_d_loss")
ADAPTATION_SCALARS = ("loss", "ce", "pseudo_ce", "pseudo_share", "adv",
                      "recon", "recon_source_l1", "recon_target_l1",
                      "d_loss", "recon_d_loss")


class TranslateThenSegment(nn.Module):
  """LDR's evaluation network: 0-255 RGB target images -> G -> segmenter.

  Variables: {"params": {"translator": G's, "segmenter": the segmentation
  network's}, "batch_stats": {"segmenter": ...}}. `reads_images` tells
  `evaluate.predict` to pass the images as they are (0-255 float).
  """
  translator: nn.Module
  segmenter: nn.Module
  data_config: Any
  reads_images = True

  def __call__(self, images, train: bool = False):
    translated = gan.from_unit_range(self.translator(
        gan.to_unit_range(images)))
    return self.segmenter(transforms.network_input(translated,
                                                   self.data_config), train)

  def classify(self, features):
    return self.segmenter.classify(features)


class LDR(base.Method):
  """Label-driven reconstruction; `config.ldr`."""

  name = "ldr"

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        translation_steps=200,  # phase 0 length (updates)
        # Translation networks (CycleGAN: 64 channels, 9 blocks, 64 / 3).
        gen_channels=16,
        gen_blocks=2,
        disc_channels=16,
        disc_layers=2,
        lambda_cycle=10.0,
        # Reconstruction network and its multi-scale discriminator
        # (pix2pixHD: 64 channels, 9 blocks; 3 scales of 64 / 3).
        recon_channels=16,
        recon_blocks=2,
        recon_disc_channels=16,
        recon_disc_layers=2,
        recon_scales=2,
        temperature=0.5,  # of the label map softmax(logits / T)
        lambda_recon=0.01,  # reconstruction loss into the segmentation net
        lambda_fm=10.0,
        lambda_perceptual=10.0,
        # Self-training on translated target images.
        pseudo_threshold=0.9,
        lambda_pseudo=1.0,
        # Output-space alignment (AdaptSegNet's discriminator and Adam).
        lambda_adv=0.001,
        output_disc_channels=(64, 128, 256, 512),
        output_disc_lr=1e-4,
        # Adam of the GANs (CycleGAN / pix2pixHD), poly-decayed per phase.
        gan_lr=2e-4,
        gan_b1=0.5,
        gan_b2=0.999,
        translate_at_eval=True,
    ))

  def __init__(self, config):
    super().__init__(config)
    block = self.block
    if block.translation_steps < 0:
      raise ValueError(f"config.ldr.translation_steps="
                       f"{block.translation_steps}; expected >= 0")
    if block.temperature <= 0:
      raise ValueError(f"config.ldr.temperature={block.temperature}; "
                       "expected > 0")
    self.translator = gan.ResnetGenerator(block.gen_channels,
                                          block.gen_blocks)
    self.image_disc = gan.PatchDiscriminator(block.disc_channels,
                                             block.disc_layers)
    self.reconstructor = gan.ResnetGenerator(block.recon_channels,
                                             block.recon_blocks)
    self.recon_disc = gan.MultiScaleDiscriminator(
        block.recon_disc_channels, block.recon_disc_layers,
        block.recon_scales)
    self.output_disc = adaptsegnet.FCDiscriminator(
        tuple(block.output_disc_channels))

  def batch_fields(self, domain):
    return ("image", "label") if domain == "source" else ("image",)

  # Networks, optimizers, phases.

  def extra_networks(self):
    h, w = self.config.data.crop_size
    m = self.config.model.num_classes
    image = jnp.zeros((1, h, w, 3))
    labels = jnp.zeros((1, h, w, m))
    return {
        TRANSLATOR: (self.translator, (image,)),
        BACK_TRANSLATOR: (self.translator, (image,)),
        IMAGE_DISCS["source"]: (self.image_disc, (image,)),
        IMAGE_DISCS["target"]: (self.image_disc, (image,)),
        RECONSTRUCTOR: (self.reconstructor, (labels,)),
        RECON_DISC: (self.recon_disc, (jnp.zeros((1, h, w, m + 3)),)),
        OUTPUT_DISC: (self.output_disc, (labels,)),
    }

  def _adaptation_horizon(self):
    return max(self.config.optim.schedule_steps - self.block.translation_steps,
               1)

  def _segmentation_config(self):
    config = self.config.copy_and_resolve_references()
    config.optim.schedule_steps = self._adaptation_horizon()
    return config

  def _adam(self, tree):
    block = self.block
    if tree in TRANSLATION_TREES:
      return optim.adam_poly(block.gan_lr, max(block.translation_steps, 1),
                             self.config.optim.poly_power, block.gan_b1,
                             block.gan_b2)
    if tree == OUTPUT_DISC:
      return optim.adam_poly(block.output_disc_lr, self._adaptation_horizon(),
                             self.config.optim.poly_power, 0.9, 0.99)
    return optim.adam_poly(block.gan_lr, self._adaptation_horizon(),
                           self.config.optim.poly_power, block.gan_b1,
                           block.gan_b2)

  def create_optimizer(self, tree):
    # Each tree is updated in its own phase only (`phase_of`), so its
    # optimizer's step count, hence its schedule, counts that phase's
    # updates.
    if tree == base.SEGMENTATION:
      return optim.create_optimizer(self._segmentation_config())
    if tree in TRANSLATION_TREES + ADAPTATION_TREES:
      return self._adam(tree)[0]
    return super().create_optimizer(tree)

  def phase_of(self, step):
    return 0 if step < self.block.translation_steps else 1

  def learning_rates(self, step):
    t = self.block.translation_steps
    late = jnp.maximum(step - t, 0)
    seg = optim.create_learning_rate_fn(self._segmentation_config())
    return {"learning_rate": jnp.where(step >= t, seg(late), 0.0),
            "translation_learning_rate": jnp.where(
                step < t, self._adam(TRANSLATOR)[1](step), 0.0),
            "reconstruction_learning_rate": jnp.where(
                step >= t, self._adam(RECONSTRUCTOR)[1](late), 0.0)}

  # Evaluation: translate, then segment.

  def eval_model(self):
    if not self.block.translate_at_eval:
      return self.model
    return TranslateThenSegment(self.translator, self.model, self.config.data)

  def eval_variables(self, networks):
    seg = networks[base.SEGMENTATION]
    if not self.block.translate_at_eval:
      return seg
    return {"params": {"translator": networks[TRANSLATOR]["params"],
                       "segmenter": seg["params"]},
            "batch_stats": {"segmenter": seg["batch_stats"]}}

  # The update.

  def _translate(self, params, images):
    return self.translator.apply({"params": params}, images)

  def _disc(self, params, images):
    return self.image_disc.apply({"params": params}, images)

  def translation_grads(self, variables, micro):
    """Phase 0: gradients of the four translation trees; scalars."""
    block = self.block
    params = {n: variables[n]["params"] for n in TRANSLATION_TREES}
    real = {d: gan.to_unit_range(micro[d]["image"]) for d in base.DOMAINS}

    def generator_loss(gen):
      fake_s = self._translate(gen[TRANSLATOR], real["target"])
      fake_t = self._translate(gen[BACK_TRANSLATOR], real["source"])
      cycle = (gan_losses.l1_loss(
          self._translate(gen[BACK_TRANSLATOR], fake_s), real["target"]) +
               gan_losses.l1_loss(
                   self._translate(gen[TRANSLATOR], fake_t), real["source"]))
      adv = (gan_losses.lsgan_loss(
          self._disc(params[IMAGE_DISCS["source"]], fake_s)[-1], True) +
             gan_losses.lsgan_loss(
                 self._disc(params[IMAGE_DISCS["target"]], fake_t)[-1], True))
      total = adv + block.lambda_cycle * cycle
      fakes = jax.lax.stop_gradient({"source": fake_s, "target": fake_t})
      return total, ({"translation_adv": adv, "cycle": cycle}, fakes)

    gen = {n: params[n] for n in (TRANSLATOR, BACK_TRANSLATOR)}
    (g_loss, (terms, fakes)), grads = jax.value_and_grad(
        generator_loss, has_aux=True)(gen)

    def disc_loss(p, domain):
      return 0.5 * (gan_losses.lsgan_loss(self._disc(p, real[domain])[-1],
                                          True) +
                    gan_losses.lsgan_loss(self._disc(p, fakes[domain])[-1],
                                          False))

    d_total = 0.0
    for domain, tree in IMAGE_DISCS.items():
      d, grads[tree] = jax.value_and_grad(disc_loss)(params[tree], domain)
      d_total = d_total + d
    return grads, {"translation_loss": g_loss, **terms,
                   "image_d_loss": d_total}

  def _features(self, seg, images):
    """Layer4 features (eval mode, parameters held fixed) of 0-255 images,
    unit-normalised over channels: the perceptual loss's feature extractor.

    Unnormalised, their scale is whatever the segmentation network's
    running statistics make it: on the demo the perceptual term reached
    3.7e3 at the start of phase 1 and, through lambda_recon, diverged the
    segmentation network within 5 updates (seed 2). Per-pixel unit vectors
    (as LPIPS normalises its features) bound it by 2.
    """
    fixed = jax.lax.stop_gradient(seg)
    return gan_losses.unit_normalize(self.model.apply(
        fixed, base.encode(images, self.config))["features"])

  def adaptation_grads(self, variables, micro):
    """Phase 1: gradients of the segmentation network and of the three
    adaptation trees; new BatchNorm statistics; scalars."""
    block, config = self.block, self.config
    seg = variables[base.SEGMENTATION]
    translated = jax.lax.stop_gradient(gan.from_unit_range(self._translate(
        variables[TRANSLATOR]["params"],
        gan.to_unit_range(micro["target"]["image"]))))
    images = {"source": micro["source"]["image"].astype(jnp.float32),
              "target": translated}
    labels = base.labels_of(micro, "source")
    size = labels.shape[1:3]
    ignore = config.loss.ignore_label
    out_disc = variables[OUTPUT_DISC]["params"]
    recon_disc = variables[RECON_DISC]["params"]

    def loss_fn(trained, batch_stats):
      seg_params, rec_params = trained
      pair = {d: {"image": images[d]} for d in base.DOMAINS}
      out_s, out_t, batch_stats = base.forward_pair(
          self.model, seg_params, batch_stats, pair, config)
      up = {"source": losses.upsample_bilinear(
          losses.at_least_f32(out_s["logits"]), size),
            "target": losses.upsample_bilinear(
                losses.at_least_f32(out_t["logits"]), size)}
      pseudo = gan_losses.confident_pseudo_labels(
          up["target"], block.pseudo_threshold, ignore)
      terms = {"ce": losses.cross_entropy(up["source"], labels, ignore),
               "pseudo_ce": losses.cross_entropy(up["target"], pseudo,
                                                 ignore),
               "pseudo_share": jnp.mean((pseudo != ignore).astype(
                   jnp.float32))}
      probs = {d: jax.nn.softmax(up[d], axis=-1) for d in base.DOMAINS}
      terms["adv"] = adaptsegnet.bce_with_logits(
          self.output_disc.apply({"params": out_disc}, probs["target"]),
          adaptsegnet.SOURCE_LABEL)
      recon, pairs = 0.0, {}
      for d in base.DOMAINS:
        label_map = gan_losses.scale_gradient(
            gan_losses.soft_label_map(up[d], block.temperature),
            jnp.float32(block.lambda_recon))
        real = gan.to_unit_range(images[d])
        fake = self.reconstructor.apply({"params": rec_params}, label_map)
        d_fake = self.recon_disc.apply(
            {"params": recon_disc}, jnp.concatenate([label_map, fake], -1))
        d_real = self.recon_disc.apply(
            {"params": recon_disc},
            jax.lax.stop_gradient(jnp.concatenate([label_map, real], -1)))
        perceptual = gan_losses.perceptual_loss(
            [self._features(seg, (fake + 1.0) * 127.5)],
            [self._features(seg, images[d])])
        fm = gan_losses.feature_matching_loss(d_fake, d_real)
        adv = gan_losses.multiscale_lsgan_loss(d_fake, True)
        terms[f"recon_{d}_l1"] = gan_losses.l1_loss(fake, real)
        recon = recon + (adv + block.lambda_fm * fm +
                         block.lambda_perceptual * perceptual)
        pairs[d] = jax.lax.stop_gradient((label_map, real, fake))
      terms["recon"] = recon
      seg_objective = (terms["ce"] + block.lambda_pseudo * terms["pseudo_ce"]
                       + block.lambda_adv * terms["adv"])
      terms["loss"] = seg_objective + block.lambda_recon * recon
      # The gradient: the label maps scale what reaches the segmentation
      # network from `recon` by lambda_recon; R gets all of it.
      return seg_objective + recon, (terms, batch_stats,
                                     jax.lax.stop_gradient(probs), pairs)

    (_, (terms, batch_stats, probs, pairs)), (seg_grads, rec_grads) = (
        jax.value_and_grad(loss_fn, has_aux=True)(
            (seg["params"], variables[RECONSTRUCTOR]["params"]),
            seg["batch_stats"]))
    grads = {base.SEGMENTATION: seg_grads, RECONSTRUCTOR: rec_grads}

    def output_disc_loss(p):
      return adaptsegnet.discriminator_loss(
          p, probs["source"], probs["target"],
          discriminator=self.output_disc)

    terms["d_loss"], grads[OUTPUT_DISC] = jax.value_and_grad(
        output_disc_loss)(out_disc)

    def recon_disc_loss(p):
      total = 0.0
      for label_map, real, fake in pairs.values():
        total = total + 0.5 * (
            gan_losses.multiscale_lsgan_loss(self.recon_disc.apply(
                {"params": p}, jnp.concatenate([label_map, real], -1)), True)
            + gan_losses.multiscale_lsgan_loss(self.recon_disc.apply(
                {"params": p}, jnp.concatenate([label_map, fake], -1)),
                                               False))
      return total

    terms["recon_d_loss"], grads[RECON_DISC] = jax.value_and_grad(
        recon_disc_loss)(recon_disc)
    return grads, batch_stats, terms

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, step
    # Both phases log the same scalars (the other phase's as 0); "loss",
    # the segmentation network's objective, is 0 in phase 0.
    if phase == 0:
      grads, scalars = self.translation_grads(variables, micro)
      stats = {}
    else:
      grads, seg_stats, scalars = self.adaptation_grads(variables, micro)
      stats = {base.SEGMENTATION: seg_stats}
    return grads, stats, {
        k: jnp.asarray(scalars.get(k, 0.0), jnp.float32)
        for k in TRANSLATION_SCALARS + ADAPTATION_SCALARS}
