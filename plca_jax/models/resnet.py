"""Caffe/DeepLab-flavoured ResNet-18/34/50/101 backbones.

docs/method.md, Network.

Written in Flax Linen rather than NNX: a Linen model is a pure function of a
parameter pytree, so the train state, orbax checkpoints, shardings and buffer
donation all stay plain pytrees (the pattern of flax `examples/imagenet` and
big_vision), and weight conversion is a dictionary rewrite.

Differences from torchvision's ResNet, all as in the authors' release:
- bottleneck blocks put the stride on the first 1x1 conv, not on the 3x3;
- the stem max-pool uses ceil mode (pad 1);
- layer3 and layer4 replace their stride by dilation 2 and 4 in every block
  (the first included; its 1x1 shortcut then has stride 1), so the output
  stride is 8: a 730x730 input gives a 92x92 feature map.

Submodule names follow the PyTorch state-dict names (`conv1`, `bn1`,
`layer3_0`, `downsample_conv`, ...) so converted weights map one to one.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from plca_jax import xla
from plca_jax.models import conv as conv_lib
from plca_jax.models import norm as norm_lib

# He-normal with fan_out, as torchvision initialises its convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, stride, name, *, dilation, dtype,
          dot_weight_grad=False):
  """Bias-free conv; 3x3 kernels get `dilation` and padding = dilation.

  `dot_weight_grad`: `conv.Conv` (the weight gradient as matrix products,
  for XLA:CPU) instead of `nn.Conv`; the same variables either way.
  """
  d = dilation if kernel == 3 else 1
  p = d * (kernel // 2)
  if dot_weight_grad:
    return conv_lib.Conv(features, (kernel, kernel), (stride, stride),
                         padding=((p, p), (p, p)), kernel_dilation=(d, d),
                         dtype=dtype, kernel_init=conv_init, name=name)
  return nn.Conv(features, (kernel, kernel), (stride, stride),
                 padding=[(p, p), (p, p)], kernel_dilation=(d, d),
                 use_bias=False, dtype=dtype, kernel_init=conv_init, name=name)


def max_pool_ceil(x, window=3, stride=2, padding=1):
  """Max-pool over H and W like `torch.nn.MaxPool2d(..., ceil_mode=True)`.

  Args:
    x: (N, H, W, C).
    window, stride, padding: pooling geometry (square).

  Returns:
    (N, H', W', C) with H' = ceil((H + 2p - k) / s) + 1, minus one when the
    last window would start inside the right padding (PyTorch's rule).
  """
  pads = []
  for size in x.shape[1:3]:
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:
      out -= 1
    hi = max(0, (out - 1) * stride + window - size - padding)
    pads.append((padding, hi))
  # nn.max_pool pads with -inf, so padding never wins the max.
  return nn.max_pool(x, (window, window), (stride, stride), padding=pads)


# remat="block_keep_3x3" keeps the values named so: in each block, the
# output of the 3x3 convolution whose recomputation no other kept-for-the-
# backward value needs (a bottleneck's conv2; a basic block's conv1).
KEEP_NAME = "block_3x3_output"


def _keep(y):
  return checkpoint_name(y, KEEP_NAME)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); stride on the first, dilation on both."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  norm: Callable[..., nn.Module] = norm_lib.BatchNorm
  dtype: Any = jnp.float32
  dot_weight_grad: bool = False  # see _conv
  expansion = 1

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dilation=self.dilation, dtype=self.dtype,
                             dot_weight_grad=self.dot_weight_grad)
    y = _keep(conv(self.planes, 3, self.stride, "conv1")(x))
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, 3, 1, "conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, self.stride,
               "downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (dilated) -> 1x1 x4 bottleneck; the stride on the first
  1x1 conv (Caffe, DeepLab; `stride_on="1x1"`) or on the 3x3 conv
  (torchvision; "3x3")."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  norm: Callable[..., nn.Module] = norm_lib.BatchNorm
  dtype: Any = jnp.float32
  stride_on: str = "1x1"
  dot_weight_grad: bool = False  # see _conv
  expansion = 4

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dilation=self.dilation, dtype=self.dtype,
                             dot_weight_grad=self.dot_weight_grad)
    on_3x3 = self.stride_on == "3x3"
    y = conv(self.planes, 1, 1 if on_3x3 else self.stride, "conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _keep(conv(self.planes, 3, self.stride if on_3x3 else 1, "conv2")(y))
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.planes * 4, 1, 1, "conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.downsample:
      x = conv(self.planes * self.expansion, 1, self.stride,
               "downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


REMAT_MODES = ("none", "block", "block_keep_3x3")  # see ResNet.remat
STRIDE_ON = ("1x1", "3x3")

# depth -> (block class, blocks per layer)
RESNET_SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
  """Output-stride-8 dilated ResNet; returns the layer4 features (N, H/8, W/8, C).

  Attributes:
    depth: 18, 34, 50 or 101.
    width: channels of the stem and of layer1 (64 in every standard ResNet;
      tests use smaller values for tiny models).
    layer_dilations: dilation of layer1..4 (1, 1, 2, 4 for DeepLab-V2); a
      layer whose dilation exceeds the previous layer's has stride 1.
    dtype: computation dtype (parameters are always float32).
    remat: "none"; "block": every residual block recomputes its
      activations in the backward pass, so the forward pass keeps only the
      block inputs (`flax.linen.remat`); "block_keep_3x3": the same, but
      each block also keeps its 3x3 convolution's output (`KEEP_NAME`, a
      `jax.checkpoint` policy), so the backward pass recomputes the 1x1
      convolutions only (bottlenecks; a basic block recomputes its second
      3x3). R101 at 730x730: 1.18x the memory of "block" kept per image
      pair, for an update at 321x321 0.94x its time on a CPU
      (benchmarks/memory.py, benchmarks/step.py --remat=MODE).
    block_barrier: materialise every block output once
      (`lax.optimization_barrier`). XLA:CPU otherwise copies the cheap
      residual add/ReLU chain into every consumer, recomputing whole layers
      (quadratic in the block count); `plca_jax.xla` keeps the barrier
      through XLA:CPU's passes. None (default): in CPU programs only.
    dot_weight_grads: every conv's weight gradient as matrix products
      (`conv.Conv`) instead of XLA's weight-gradient convolution, which
      XLA:CPU runs slowly. None (default): in CPU programs only.
    bn_groups: training-mode BatchNorm normalises G interleaved groups of
      the batch (row n in group n % G) each with its own statistics, so G
      domains can share one pass (`methods.base.forward_pair`).
    scan_blocks: apply the identical blocks after the first of each layer
      (layer3's 22 in ResNet-101) as one `lax.scan` over their stacked
      variables. The variables stay one subtree per block (`layer3_5`,
      ...), stacked and unstacked inside the program, so checkpoints and
      converted weights do not change. The compiler then generates one
      block's kernels per layer instead of one per block: the TPU compile
      of the update shrinks with the code (`python -m plca_jax.aot`,
      docs/performance.md). None (default): in TPU programs only; XLA:GPU
      compiles the unrolled update as fast and its cost model charges the
      scanned one more memory traffic, and CPU programs keep per-block
      barriers and forms. Initialisation always runs the unrolled blocks,
      so the initial values do not depend on it.
  """
  depth: int = 101
  width: int = 64
  layer_dilations: Sequence[int] = (1, 1, 2, 4)
  bn_momentum: float = 0.9  # PyTorch momentum 0.1
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  remat: str = "none"
  block_barrier: Optional[bool] = None  # None: on a CPU program (xla)
  return_layer3: bool = False  # return (layer3 output, layer4 output)
  # Bottleneck stride placement: "1x1" (Caffe/DeepLab weights) or "3x3"
  # (torchvision weights); basic blocks stride their first 3x3 conv.
  stride_on: str = "1x1"
  bn_groups: int = 1  # see norm.BatchNorm.groups
  dot_weight_grads: Optional[bool] = None  # None: on a CPU program (xla)
  scan_blocks: Optional[bool] = None  # None: on a TPU program (xla)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.remat not in REMAT_MODES:
      raise ValueError(f"config.model.remat={self.remat!r}; expected one of "
                       f"{REMAT_MODES}")
    if self.depth not in RESNET_SPECS:
      raise ValueError(f"ResNet depth {self.depth} not in "
                       f"{sorted(RESNET_SPECS)}")
    if self.stride_on not in STRIDE_ON:
      raise ValueError(f"config.model.stride_on={self.stride_on!r}; "
                       f"expected one of {STRIDE_ON}")
    block_cls, layers = RESNET_SPECS[self.depth]
    cpu = xla.on_cpu()  # the platform of the program being traced
    barrier = cpu if self.block_barrier is None else self.block_barrier
    dot_grads = cpu if self.dot_weight_grads is None else (
        self.dot_weight_grads)
    scan = (xla.target_platform() == "tpu" if self.scan_blocks is None
            else self.scan_blocks)
    scan = scan and not self.is_initializing()
    extra = {"stride_on": self.stride_on} if block_cls is Bottleneck else {}
    plain_cls, policy = block_cls, None
    if self.remat == "block_keep_3x3":
      policy = jax.checkpoint_policies.save_only_these_names(KEEP_NAME)
    if self.remat != "none":
      block_cls = nn.remat(block_cls, policy=policy)
    norm = functools.partial(
        norm_lib.BatchNorm, use_running_average=not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        groups=self.bn_groups)

    x = x.astype(self.dtype)
    x = _conv(self.width, 7, 2, "conv1", dilation=1, dtype=self.dtype,
              dot_weight_grad=dot_grads)(x)
    x = nn.relu(norm(name="bn1")(x))
    x = max_pool_ceil(x)

    in_channels = self.width
    prev_dilation = 1
    layer3 = None
    for i, num_blocks in enumerate(layers):
      planes = self.width * 2**i
      dilation = self.layer_dilations[i]
      # layer1 never strides; later layers stride 2 unless dilated instead.
      stride = 1 if i == 0 or dilation > prev_dilation else 2
      prev_dilation = dilation
      out_channels = planes * block_cls.expansion
      for b in range(num_blocks):
        first = b == 0
        fields = dict(
            planes=planes,
            stride=stride if first else 1,
            dilation=dilation,
            downsample=first and (stride != 1 or in_channels != out_channels),
            norm=norm, dtype=self.dtype,
            dot_weight_grad=dot_grads, **extra)
        if b == 1 and scan and num_blocks > 2:
          names = [f"layer{i + 1}_{k}" for k in range(1, num_blocks)]
          x = self._scan(plain_cls(**fields, parent=None), names, x,
                         self.remat != "none", policy, barrier)
          break
        x = block_cls(**fields, name=f"layer{i + 1}_{b}")(x)
        if barrier:
          with xla.form("block_barrier"):
            x = jax.lax.optimization_barrier(x)
        in_channels = out_channels
      if i == 2:
        layer3 = x
    return (layer3, x) if self.return_layer3 else x

  def _scan(self, block, names, x, remat, policy, barrier):
    """Applies the blocks `names` (children of this module, all of the
    form `block`, an unbound module) to x in turn, as one `lax.scan` over
    their variables stacked along a new leading axis; writes back the
    mutable collections (BatchNorm's running statistics) block by block."""
    variables = self.variables
    cols = [c for c in variables if names[0] in variables[c]]
    stacked = {c: jax.tree.map(lambda *a: jnp.stack(a),
                               *[variables[c][n] for n in names])
               for c in cols}
    mutable = [c for c in cols
               if c != "params" and self.is_mutable_collection(c)]

    def body(y, block_vars):
      if mutable:
        y, updated = block.apply(block_vars, y, mutable=mutable)
      else:
        y, updated = block.apply(block_vars, y), {}
      if barrier:
        with xla.form("block_barrier"):
          y = jax.lax.optimization_barrier(y)
      return y, updated

    if remat:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, updated = jax.lax.scan(body, x, stacked)
    for c in mutable:
      for k, name in enumerate(names):
        self.put_variable(c, name,
                          jax.tree.map(lambda a, k=k: a[k], updated[c]))
    return x
