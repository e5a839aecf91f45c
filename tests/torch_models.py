"""A PyTorch DeepLab-V2 (docs/method.md, Network), with the release's key
names.

Test-only reference: torchvision-style ResNet keys (`conv1`, `bn1`,
`layerL.B.convN`, `layerL.B.downsample.{0,1}`, `fc`), Caffe-style strides
(on the first 1x1 conv; `stride_on="3x3"` puts them on the 3x3 conv like
torchvision), ceil-mode max-pool, dilation 2/4 in layer3/4 on
every block, and the DeepLab head `classifier.0.convs.{i}.0` (four bias-free
dilated 3x3 convs, summed).
"""

import torch
from torch import nn

SPECS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
         50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, dilation, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (x if self.downsample is None
                           else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, dilation, downsample,
               stride_on="1x1"):
    super().__init__()
    on_3x3 = stride_on == "3x3"
    self.conv1 = nn.Conv2d(cin, planes, 1, 1 if on_3x3 else stride,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride if on_3x3 else 1,
                           dilation, dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (x if self.downsample is None
                           else self.downsample(x)))


class ResNet(nn.Module):
  """Dilated (output stride 8) ResNet with an ImageNet `fc` (unused)."""

  def __init__(self, depth, stride_on="1x1"):
    super().__init__()
    kind, layers = SPECS[depth]
    block = Bottleneck if kind == "bottleneck" else Basic
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    cin = 64
    for i, (n, dilation) in enumerate(zip(layers, (1, 1, 2, 4))):
      planes = 64 * 2**i
      stride = 2 if i == 1 else 1  # layer3/4 dilate instead of striding
      blocks = []
      for b in range(n):
        down = None
        if b == 0 and (stride != 1 or cin != planes * block.expansion):
          down = nn.Sequential(
              nn.Conv2d(cin, planes * block.expansion, 1, stride,
                        bias=False),
              nn.BatchNorm2d(planes * block.expansion))
        extra = {"stride_on": stride_on} if kind == "bottleneck" else {}
        blocks.append(block(cin, planes, stride if b == 0 else 1, dilation,
                            down, **extra))
        cin = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.out_channels = cin
    self.fc = nn.Linear(cin, 1000)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return x


class ASPP(nn.Module):

  def __init__(self, cin, num_classes):
    super().__init__()
    self.convs = nn.ModuleList([
        nn.Sequential(nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r,
                                bias=False)) for r in (6, 12, 18, 24)])

  def forward(self, x):
    return sum(conv(x) for conv in self.convs)


class DeepLabV2(nn.Module):

  def __init__(self, depth, num_classes):
    super().__init__()
    self.backbone = ResNet(depth)
    del self.backbone.fc
    self.classifier = nn.Sequential(ASPP(self.backbone.out_channels,
                                         num_classes))

  def forward(self, x):
    features = self.backbone(x)
    return features, self.classifier(features)


def randomize(module, seed):
  """Random weights and BatchNorm statistics (so eval mode is non-trivial)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) *
                       (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + torch.rand(c, generator=gen))
        m.bias.copy_(0.2 * torch.randn(c, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
  return module.eval()
