"""FDA + pixel-level contrastive learning with pseudo-labels (two stages).

Stage 1 (`pseudo_label_dir` empty; run it with `config.data.grayscale=True`,
as `configs/pixel_contrast.py:stage1` does): grayscale images of both
domains, CE on the source and the Charbonnier entropy
(`fda.robust_entropy`) on the target. Its pseudo-labels for the target
training images are written by the MBT tool on the one stage-1 model
(`python -m plca_jax.methods.mbt --workdirs=STAGE1`, class-wise
thresholds; it reads the stage-1 config, grayscale included).

Stage 2 (`pseudo_label_dir` set; colour images): CE on the source stylised
to the target (`fda.spectral_transfer`, `beta`), the entropy on the target,
and the pixel-level contrastive loss (`losses.contrastive`) between the
features of a target image I_t and those of its source-styled translation
I_t->s (target -> source spectral transfer, same geometry), the positives
of a pixel being the pixels of I_t->s with the same pseudo-label (labels
nearest-downsampled to the feature grid, 255 ignored on both sides).

total = ce + entropy_weight * entropy [+ contrast_weight * contrast].

The contrastive weight and temperature (0.1 and 0.1) are this project's
defaults: the method's own training code cannot be read here. BatchNorm as
the project's (per-pass batch statistics; three passes per micro-batch in
stage 2: stylised source, target, translated target).
"""

import functools

from absl import logging
import jax.numpy as jnp
import ml_collections

from plca_jax import losses
from plca_jax.losses import contrastive
from plca_jax.methods import base
from plca_jax.methods import fda
from plca_jax.methods import pseudo_labels


def pixel_contrast_loss(params, batch_stats, micro, step, *, model, config,
                        block):
  """One micro-batch: (total, (terms, new batch_stats))."""
  del step
  images_s = micro["source"]["image"].astype(jnp.float32)
  images_t = micro["target"]["image"].astype(jnp.float32)
  stage2 = bool(block.pseudo_label_dir)
  inputs_s = (fda.spectral_transfer(images_s, images_t, block.beta)
              if stage2 else images_s)
  terms, out_t, batch_stats = fda.ce_and_entropy(
      model, params, batch_stats, inputs_s, images_t, micro, config,
      block.eta)
  total = terms["ce"] + block.entropy_weight * terms["entropy"]
  if stage2:
    translated = fda.spectral_transfer(images_t, images_s, block.beta)
    out_ts, batch_stats = base.forward(model, params, batch_stats,
                                       base.encode(translated, config))
    grid = out_t["features"].shape[1:3]
    pseudo = losses.downsample_labels(
        base.labels_of(micro, "target", pseudo_labels.FIELD), grid)
    terms["contrast"] = contrastive.pixel_contrast_loss(
        out_t["features"], out_ts["features"], pseudo,
        num_classes=config.model.num_classes, tau=block.tau,
        ignore_label=config.loss.ignore_label, chunk_size=block.chunk_size or None)
    total = total + block.contrast_weight * terms["contrast"]
  return total, (terms, batch_stats)


class PixelContrast(pseudo_labels.TargetPseudoLabels, base.Method):
  """Two-stage FDA + pixel contrast; `config.pixel_contrast`."""

  name = "pixel_contrast"

  def __init__(self, config):
    super().__init__(config)
    if not self.block.pseudo_label_dir and not config.data.grayscale:
      logging.warning(
          "pixel_contrast stage 1 (no pseudo_label_dir) trains on grayscale "
          "images in its recipe; config.data.grayscale is False "
          "(configs/pixel_contrast.py:stage1 sets it).")

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        beta=0.01,  # spectral transfer window (stage 2), as FDA's
        entropy_weight=0.005,
        eta=2.0,  # Charbonnier exponent of the entropy
        # Stage 2: pseudo-labels written by `python -m plca_jax.methods.mbt`
        # from the stage-1 run; "" = stage 1.
        pseudo_label_dir="",
        contrast_weight=0.1,
        tau=0.1,  # temperature
        chunk_size=256,  # rows of similarities at a time (0: all)
    ))

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del rng, phase
    return base.segmentation_grads(functools.partial(
        pixel_contrast_loss, model=self.model, config=self.config,
        block=self.block), variables, micro, step)
