"""DACS (Tranheden et al., WACV 2021): mean-teacher self-training on
cross-domain mixed images (ClassMix).

Per micro-batch:
1. The teacher (an exponential moving average of the student's parameters
   and BatchNorm statistics, the tree "teacher") predicts the target images
   in evaluation mode, without gradient: pseudo-labels (argmax) and, per
   image, the share of pixels whose top probability exceeds
   `pseudo_threshold`, the weight of its pseudo-labelled pixels.
2. ClassMix: for each source image, a random half (rounded up) of the label
   values present in its label, 255 included as in the authors' code, is
   pasted with its pixels onto the paired target image and its
   pseudo-label; pasted pixels weigh 1.
3. The mixed images get the authors' strong augmentation (colour jitter,
   Gaussian blur) from the micro-batch's key.
4. Loss: CE on the source batch plus the pixel-weighted CE on the mixed
   batch (mean over all pixels, as the authors'), both on logits upsampled
   to the label size. With `plca_terms`, PLCA's objective (config.loss:
   source CE, Lovasz, associations, LSR) on the source-target pair replaces
   the source CE.
After each optimizer update the teacher moves towards the student:
alpha_t = min(1 - 1 / (t + 1), ema_alpha) for the update t = 0, 1, ...
(`after_update`); its optimizer never changes it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from plca_jax import losses
from plca_jax.data import transforms
from plca_jax.methods import base

TEACHER = "teacher"


def ema_alpha(step, alpha):
  """The authors' warm-up: min(1 - 1 / (step + 1), alpha)."""
  return jnp.minimum(1.0 - 1.0 / (step.astype(jnp.float32) + 1.0), alpha)


def ema(teacher, student, alpha):
  """alpha * teacher + (1 - alpha) * student, leaf by leaf."""
  return jax.tree.map(lambda t, s: alpha * t + (1.0 - alpha) * s, teacher,
                      student)


def pseudo_labels(logits, threshold):
  """(labels (N, H, W), per-image weight (N,)): the argmax, and the share
  of pixels whose top probability exceeds `threshold`."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top = jnp.max(probs, axis=-1)
  weight = jnp.mean((top > threshold).astype(jnp.float32), axis=(1, 2))
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), weight


def class_mix_masks(labels, rng, num_classes, ignore_label=255):
  """(N, H, W) bool: the pixels of a random half of each label's values.

  The candidates are the values present in each label, `ignore_label`
  included (so pasted ignore pixels stay ignored); ceil(n / 2) of the n
  present are drawn without replacement, uniformly.
  """
  index = jnp.where(labels == ignore_label, num_classes, labels)
  index = jnp.clip(index, 0, num_classes)
  present = jax.vmap(lambda x: jnp.zeros(num_classes + 1, bool).at[
      x.reshape(-1)].set(True))(index)
  scores = jnp.where(present, jax.random.uniform(rng, present.shape), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  count = jnp.sum(present, axis=1, keepdims=True)
  chosen = present & (ranks < (count + 1) // 2)
  return jnp.take_along_axis(chosen, index.reshape(index.shape[0], -1),
                             axis=1).reshape(labels.shape)


def mix(mask, source, target):
  """`source` where `mask`, else `target` (masks broadcast over channels)."""
  mask = mask.reshape(mask.shape + (1,) * (source.ndim - mask.ndim))
  return jnp.where(mask, source, target)


def _rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  low = jnp.min(rgb, axis=-1)
  delta = value - low
  safe = jnp.where(delta > 0, delta, 1.0)
  hue = jnp.where(value == r, (g - b) / safe % 6.0,
                  jnp.where(value == g, (b - r) / safe + 2.0,
                            (r - g) / safe + 4.0)) / 6.0
  hue = jnp.where(delta > 0, hue, 0.0)
  saturation = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0),
                         0.0)
  return hue, saturation, value


def _hsv_to_rgb(hue, saturation, value):
  h6 = (hue % 1.0) * 6.0
  channel = lambda n: value - value * saturation * jnp.clip(
      jnp.minimum((n + h6) % 6.0, 4.0 - (n + h6) % 6.0), 0.0, 1.0)
  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def color_jitter(images, rng, strength, prob):
  """Brightness, contrast, saturation and hue jitter of (N, H, W, 3) RGB
  in [0, 1], each factor drawn per image; applied with probability `prob`
  per image (the authors': kornia's ColorJitter(s, s, s, s), s = 0.2,
  applied with probability 0.8)."""
  n = images.shape[0]
  keys = jax.random.split(rng, 5)
  factor = lambda k: jax.random.uniform(k, (n, 1, 1), minval=1 - strength,
                                        maxval=1 + strength)
  out = images * factor(keys[0])[..., None]
  out = jnp.clip(out, 0.0, 1.0)
  luma = jnp.asarray(transforms.LUMA)
  gray = jnp.mean(out @ luma, axis=(1, 2), keepdims=True)[..., None]
  out = jnp.clip((out - gray) * factor(keys[1])[..., None] + gray, 0.0, 1.0)
  pixel_luma = (out @ luma)[..., None]
  out = jnp.clip((out - pixel_luma) * factor(keys[2])[..., None] +
                 pixel_luma, 0.0, 1.0)
  hue, saturation, value = _rgb_to_hsv(out)
  shift = jax.random.uniform(keys[3], (n, 1, 1), minval=-strength,
                             maxval=strength)
  out = _hsv_to_rgb(hue + shift, saturation, value)
  apply = jax.random.uniform(keys[4], (n, 1, 1, 1)) < prob
  return jnp.where(apply, out, images)


def blur_kernel_size(height, fraction=0.1):
  """The authors' odd kernel size of about `fraction` of the height."""
  size = math.ceil(fraction * height)
  return int(math.floor(size - 0.5 + size % 2))


def gaussian_blur(images, rng, sigma_range, prob, fraction=0.1):
  """Separable Gaussian blur of (N, H, W, C), sigma drawn per image in
  `sigma_range`, reflect padding; applied with probability `prob` per
  image (the authors': probability 0.5, sigma in [0.15, 1.15])."""
  n, h, _, _ = images.shape
  size = max(blur_kernel_size(h, fraction), 1)
  key_sigma, key_apply = jax.random.split(rng)
  sigma = jax.random.uniform(key_sigma, (n, 1), minval=sigma_range[0],
                             maxval=sigma_range[1])
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  kernel = jnp.exp(-0.5 * (x[None] / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel, axis=1, keepdims=True)  # (N, size)
  pad = size // 2

  def one(image, k):
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rows = sum(k[i] * padded[i:i + image.shape[0]] for i in range(size))
    return sum(k[i] * rows[:, i:i + image.shape[1]] for i in range(size))

  out = jax.vmap(one)(images, kernel)
  apply = jax.random.uniform(key_apply, (n, 1, 1, 1)) < prob
  return jnp.where(apply, out, images)


def strong_augment(images, rng, block):
  """The authors' strong augmentation of 0-255 RGB images (N, H, W, 3)."""
  key_jitter, key_blur = jax.random.split(rng)
  out = color_jitter(images / 255.0, key_jitter, block.jitter_strength,
                     block.jitter_prob)
  out = gaussian_blur(out, key_blur, tuple(block.blur_sigma),
                      block.blur_prob)
  return out * 255.0


def weighted_cross_entropy(logits, labels, weights, ignore_label):
  """mean over all pixels of CE x weight, ignored pixels counting 0 (the
  authors' CrossEntropyLoss2dPixelWiseWeighted)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ignore_label
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.mean(jnp.where(valid, nll * weights, 0.0))


def mixed_batch(micro, teacher_logits, rng, *, num_classes, block,
                ignore_label):
  """The mixed images, labels and pixel weights of one micro-batch, and
  the statistics to log (mask share, pseudo-label weight)."""
  source, target = micro["source"], micro["target"]
  labels = base.labels_of(micro, "source")
  up = losses.upsample_bilinear(teacher_logits.astype(jnp.float32),
                                target["image"].shape[1:3])
  pseudo, weight = pseudo_labels(up, block.pseudo_threshold)
  key_mask, key_aug = jax.random.split(rng)
  mask = class_mix_masks(labels, key_mask, num_classes, ignore_label)
  images = mix(mask, source["image"].astype(jnp.float32),
               target["image"].astype(jnp.float32))
  images = strong_augment(images, key_aug, block)
  mixed_labels = jnp.where(mask, labels, pseudo)
  weights = jnp.where(mask, 1.0, weight[:, None, None])
  stats = {"pseudo_weight": jnp.mean(weight),
           "mixed_source_share": jnp.mean(mask.astype(jnp.float32))}
  return images, mixed_labels, weights, pseudo, mask, stats


def micro_batch_loss(params, batch_stats, micro, teacher_logits, rng, *,
                     model, config, block):
  """DACS's loss of one micro-batch: (total, (terms, new batch_stats))."""
  ignore = config.loss.ignore_label
  images, mixed_labels, weights, pseudo, mask, stats = mixed_batch(
      micro, teacher_logits, rng, num_classes=config.model.num_classes,
      block=block, ignore_label=ignore)
  labels = base.labels_of(micro, "source")
  if block.plca_terms:
    out_s, out_t, batch_stats = base.forward_pair(
        model, params, batch_stats, micro, config, first="target")
    total, terms = losses.total_loss(config, out_s, out_t, labels, None)
    terms["source_ce"] = terms.pop("ce")
  else:
    out_s, batch_stats = base.forward(
        model, params, batch_stats, base.encode(micro["source"]["image"],
                                                config))
    up = losses.upsample_bilinear(losses.at_least_f32(out_s["logits"]),
                                  labels.shape[1:3])
    total = losses.cross_entropy(up, labels, ignore)
    terms = {"source_ce": total}
  out_m, batch_stats = base.forward(model, params, batch_stats,
                                    base.encode(images, config))
  up_m = losses.upsample_bilinear(losses.at_least_f32(out_m["logits"]),
                                  mixed_labels.shape[1:3])
  terms["mixed_ce"] = weighted_cross_entropy(up_m, mixed_labels, weights,
                                             ignore)
  total = total + terms["mixed_ce"]
  # Agreement of the student on the mixed images with the teacher's
  # pseudo-labels, over the pixels that came from the target.
  agree = (jnp.argmax(jax.lax.stop_gradient(up_m), axis=-1) == pseudo)
  from_target = (~mask).astype(jnp.float32)
  terms["agreement"] = jnp.sum(agree * from_target) / jnp.maximum(
      jnp.sum(from_target), 1.0)
  terms.update(stats)
  return total, (terms, batch_stats)


class DACS(base.Method):
  """Mean teacher + ClassMix; `config.dacs`."""

  name = "dacs"

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        ema_alpha=0.99,  # the teacher's EMA decay (after its warm-up)
        pseudo_threshold=0.968,  # top probability of a confident pixel
        jitter_strength=0.2,  # brightness/contrast/saturation/hue range
        jitter_prob=0.8,
        blur_prob=0.5,
        blur_sigma=(0.15, 1.15),
        # Add PLCA's objective (config.loss) on the source-target pair.
        plca_terms=False,
    ))

  def extra_networks(self):
    image = jnp.zeros((1, *self.config.data.crop_size, 3))
    return {TEACHER: (self.model, (image,))}

  def create_optimizer(self, tree):
    if tree == TEACHER:  # moved by `after_update` only
      return optax.set_to_zero()
    return super().create_optimizer(tree)

  def micro_batch_grads(self, variables, micro, rng, step, phase):
    del step, phase
    teacher = variables[TEACHER]
    out_t = self.model.apply(
        {"params": teacher["params"], "batch_stats": teacher["batch_stats"]},
        base.encode(micro["target"]["image"], self.config), train=False)
    teacher_logits = jax.lax.stop_gradient(out_t["logits"])
    seg = variables[base.SEGMENTATION]
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(
        functools.partial(micro_batch_loss, model=self.model,
                          config=self.config, block=self.block),
        has_aux=True)(seg["params"], seg["batch_stats"], micro,
                      teacher_logits, rng)
    return ({base.SEGMENTATION: grads}, {base.SEGMENTATION: batch_stats},
            {"loss": loss, **terms})

  def after_update(self, trees, step):
    student, teacher = trees[base.SEGMENTATION], trees[TEACHER]
    alpha = ema_alpha(step, self.block.ema_alpha)
    trees[TEACHER] = teacher.replace(
        params=ema(teacher.params, student.params, alpha),
        batch_stats=ema(teacher.batch_stats, student.batch_stats, alpha))
    return trees
