"""DeepLab-V2: dilated ResNet + summed four-branch ASPP head.

docs/method.md, Network.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from plca_jax import xla
from plca_jax.models import resnet

# Initialisations of the head's convs (docs/method.md, Network), by
# `head_init` name:
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


def aspp_as_dot(x, kernels, rates, per_tap=False):
  """The sum of dilated 3x3 convs (padding = dilation = rate) as matrix
  products and shifted adds.

  Each tap (i, j) of each conv adds x @ K[i, j] shifted by
  ((i - 1) r, (j - 1) r): the taps' products give every tap's (N, H, W, M)
  at once, and their shifted copies are summed where they land inside the
  map. Taps that land entirely outside (|offset| >= H or W) read only
  padding and are left out. The same sums as the convolutions, in another
  order. `per_tap=False`: one product of x (N*H*W, C) with the taps'
  kernels side by side (C, T*M); `per_tap=True`: a batch of T products
  (C, M), each tap's result a slice along a leading axis (no slicing
  inside the minor dimension).

  Args:
    x: (N, H, W, C).
    kernels: one (3, 3, C, M) kernel per rate, x's dtype.
    rates: the dilations.
    per_tap: the batched form.

  Returns:
    (N, H, W, M).
  """
  n, h, w, c = x.shape
  m = kernels[0].shape[-1]
  taps = [(k, i, j, (i - 1) * r, (j - 1) * r)
          for k, r in enumerate(rates) for i in range(3) for j in range(3)
          if abs((i - 1) * r) < h and abs((j - 1) * r) < w]
  if per_tap:
    weights = jnp.stack([kernels[k][i, j] for k, i, j, _, _ in taps])
    z = jnp.einsum("pc,tcm->tpm", x.reshape(-1, c), weights).reshape(
        len(taps), n, h, w, m)
    tap = lambda t: z[t]  # pylint: disable=unnecessary-lambda-assignment
  else:
    weights = jnp.concatenate([kernels[k][i, j] for k, i, j, _, _ in taps],
                              axis=1)  # (C, T*M)
    z = jnp.dot(x.reshape(-1, c), weights).reshape(n, h, w, len(taps), m)
    tap = lambda t: z[..., t, :]  # pylint: disable=unnecessary-lambda-assignment
  out = jnp.zeros((n, h, w, m), z.dtype)
  for t, (_, _, _, dy, dx) in enumerate(taps):
    # out[y, x] += z[y + dy, x + dx, t] where y + dy, x + dx are inside.
    part = tap(t)[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
    out = out + jax.lax.pad(part, jnp.zeros((), z.dtype), (
        (0, 0, 0), (max(-dy, 0), max(dy, 0), 0), (max(-dx, 0), max(dx, 0), 0),
        (0, 0, 0)))
  return out


HEAD_FORMS = ("conv", "product", "taps")
# The head's form in a program for each platform (others: "conv").
HEAD_FORM_BY_PLATFORM = {"cpu": "product", "tpu": "taps"}


class _Kernel(nn.Module):
  """A conv kernel alone, as `nn.Conv` names and initialises it."""
  shape: Sequence[int]
  init: Any

  @nn.compact
  def __call__(self):
    return self.param("kernel", self.init, tuple(self.shape), jnp.float32)


class ASPPHead(nn.Module):
  """Four parallel bias-free 3x3 convs (dilation = padding = rate), summed.

  `form` (HEAD_FORMS), with the same variables: "conv", the four
  convolutions; "product", one matrix product and shifted adds
  (`aspp_as_dot`); "taps", a batch of one product per tap and shifted
  adds (`aspp_as_dot(per_tap=True)`). XLA:CPU's convolution kernel is
  slow on these (C=2048 -> M=16, dilation up to 24) convolutions (the
  product is 4x faster forward and backward); libtpu takes minutes to
  lower each of them, and seconds for the taps' products, which it
  lowers for any class count (the single product's slices of 19 classes
  inside its minor dimension take it a minute) (docs/performance.md).
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  dtype: Any = jnp.float32
  initializer: str = "torch_default"  # a HEAD_INITS name
  form: str = "conv"

  @nn.compact
  def __call__(self, x):
    if self.form not in HEAD_FORMS:
      raise ValueError(f"ASPPHead.form={self.form!r}; expected one of "
                       f"{HEAD_FORMS}")
    if self.form != "conv":
      shape = (3, 3, x.shape[-1], self.num_classes)
      kernels = [_Kernel(shape, head_initializer(self.initializer),
                         name=f"conv{i}")().astype(self.dtype)
                 for i in range(len(self.rates))]
      with xla.form("head_" + self.form):
        return aspp_as_dot(x.astype(self.dtype), kernels, self.rates,
                           per_tap=self.form == "taps")
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
  block_barrier: Optional[bool] = None  # None: on a CPU program (xla)
  aux_head: bool = False
  stride_on: str = "1x1"  # see resnet.ResNet
  head_init: str = "torch_default"  # see HEAD_INITS
  # The head's form (ASPPHead.form; None: HEAD_FORM_BY_PLATFORM for the
  # program being built) and XLA:CPU's backbone weight gradients as matrix
  # products (resnet.ResNet.dot_weight_grads; None: on a CPU program),
  # decided at trace time (plca_jax.xla).
  head_form: Optional[str] = None
  dot_weight_grads: Optional[bool] = None
  scan_blocks: Optional[bool] = None  # see resnet.ResNet
  # Training-mode BatchNorm over G interleaved groups of the batch, each
  # with its own statistics (resnet.ResNet, norm.BatchNorm.groups).
  bn_groups: int = 1

  def setup(self):
    head_form = (HEAD_FORM_BY_PLATFORM.get(xla.target_platform(), "conv")
                 if self.head_form is None else self.head_form)
    self.backbone = resnet.ResNet(depth=self.depth, width=self.width,
                                  dtype=self.dtype, remat=self.remat,
                                  block_barrier=self.block_barrier,
                                  return_layer3=self.aux_head,
                                  stride_on=self.stride_on,
                                  bn_groups=self.bn_groups,
                                  dot_weight_grads=self.dot_weight_grads,
                                  scan_blocks=self.scan_blocks)
    self.classifier = ASPPHead(self.num_classes, self.aspp_rates,
                               dtype=self.dtype, initializer=self.head_init,
                               form=head_form)
    if self.aux_head:
      self.aux_classifier = ASPPHead(self.num_classes, self.aspp_rates,
                                     dtype=self.dtype,
                                     initializer=self.head_init,
                                     form=head_form)

  def classify(self, features):
    return self.classifier(features)

  def __call__(self, images, train: bool = False):
    if not self.aux_head:
      features = self.backbone(images, train)
      return {"features": features, "logits": self.classifier(features)}
    layer3, features = self.backbone(images, train)
    return {"features": features, "logits": self.classifier(features),
            "aux_logits": self.aux_classifier(layer3)}
