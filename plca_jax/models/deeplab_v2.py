"""DeepLab-V2: dilated ResNet + summed four-branch ASPP head (SPEC.md s. 1)."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from plca_jax.models import resnet

# Initialisations of the head's convs (SPEC.md s. 1), by `head_init` name:
# "torch_default" is PyTorch's default Conv2d init, kaiming-uniform with
# a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = 9 * C_in:
# what the PLCA release leaves its ASPP convs at. "normal_0.01" is N(0, 0.01),
# what DeepLab-V2's Caffe prototxt and the AdaptSegNet / FDA code set.
HEAD_INITS = {
    "torch_default": nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                      "uniform"),
    "normal_0.01": nn.initializers.normal(0.01),
}


def head_initializer(name):
  if name not in HEAD_INITS:
    raise ValueError(f"config.model.head_init={name!r}; expected one of "
                     f"{sorted(HEAD_INITS)}")
  return HEAD_INITS[name]


class ASPPHead(nn.Module):
  """Four parallel bias-free 3x3 convs (dilation = padding = rate), summed."""
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Any = jnp.float32
  initializer: str = "torch_default"  # a HEAD_INITS name

  @nn.compact
  def __call__(self, x):
    out = 0
    for i, r in enumerate(self.rates):
      out = out + nn.Conv(
          self.num_classes, (3, 3), padding=[(r, r), (r, r)],
          kernel_dilation=(r, r), use_bias=False, dtype=self.dtype,
          kernel_init=head_initializer(self.initializer),
          name=f"conv{i}")(x)
    return out


class DeepLabV2(nn.Module):
  """DeepLab-V2 with a ResNet-18/34/50/101 backbone at output stride 8.

  Usage: `DeepLabV2(num_classes=16, depth=101).apply(variables, images,
  train=False)` with `images` (N, H, W, 3) returns
  `{"features": (N, h, w, C), "logits": (N, h, w, num_classes)}` where
  h = ceil-ish(H / 8) (92 for 730) and C = 2048 (R50/R101) or 512 (R18/34).
  With `train=True` BatchNorm uses batch statistics and updates
  `batch_stats` (pass `mutable=["batch_stats"]`).
  `model.apply(variables, features, method="classify")` applies the head
  alone (test-time aggregation transforms the features first). With
  `aux_head=True` (AdaptSegNet's multi-level variant) a second ASPP head of
  the same form on the layer3 features adds "aux_logits" (N, h, w,
  num_classes).
  """
  num_classes: int
  depth: int = 101
  width: int = 64
  aspp_rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Any = jnp.float32
  remat: str = "none"  # see resnet.ResNet
  block_barrier: bool = False
  aux_head: bool = False
  stride_on: str = "1x1"  # see resnet.ResNet
  head_init: str = "torch_default"  # see HEAD_INITS
  # Training-mode BatchNorm over G interleaved groups of the batch, each
  # with its own statistics (resnet.ResNet, norm.BatchNorm.groups).
  bn_groups: int = 1

  def setup(self):
    self.backbone = resnet.ResNet(depth=self.depth, width=self.width,
                                  dtype=self.dtype, remat=self.remat,
                                  block_barrier=self.block_barrier,
                                  return_layer3=self.aux_head,
                                  stride_on=self.stride_on,
                                  bn_groups=self.bn_groups)
    self.classifier = ASPPHead(self.num_classes, self.aspp_rates,
                               dtype=self.dtype, initializer=self.head_init)
    if self.aux_head:
      self.aux_classifier = ASPPHead(self.num_classes, self.aspp_rates,
                                     dtype=self.dtype,
                                     initializer=self.head_init)

  def classify(self, features):
    return self.classifier(features)

  def __call__(self, images, train: bool = False):
    if not self.aux_head:
      features = self.backbone(images, train)
      return {"features": features, "logits": self.classifier(features)}
    layer3, features = self.backbone(images, train)
    return {"features": features, "logits": self.classifier(features),
            "aux_logits": self.aux_classifier(layer3)}
