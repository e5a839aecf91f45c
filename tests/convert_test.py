"""Tests of plca_jax.convert on PyTorch models built in tests/torch_models."""

import os
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import torch
import pytest

from configs import default as default_config
from plca_jax import checkpointing
from plca_jax import convert
from plca_jax import models
from plca_jax import train
from plca_jax.data import labels
from tests import torch_models


def _relative_error(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _nhwc(t):
  return np.moveaxis(t.detach().numpy(), 1, -1)


class ConvertTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path
    rng = np.random.default_rng(0)
    self.x = rng.normal(size=(2, 49, 57, 3)).astype(np.float32)

  def _load(self, out_dir, depth, num_classes, allow="", stride_on="1x1"):
    model = models.DeepLabV2(num_classes=num_classes, depth=depth,
                             stride_on=stride_on)
    init = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return model, checkpointing.load_variables(out_dir, init, allow)

  @parameterized.parameters((18, 16), (50, 19))
  def test_released_model_matches_pytorch(self, depth, num_classes):
    net = torch_models.randomize(torch_models.DeepLabV2(depth, num_classes),
                                 seed=depth)
    path = os.path.join(self.dir, "model.weights")
    # The release saves {"weights": state_dict}, here with DataParallel's
    # "module." prefix.
    torch.save({"weights": {"module." + k: v
                            for k, v in net.state_dict().items()}}, path)
    out = os.path.join(self.dir, "flax")
    _, got_depth, got_classes = convert.convert(path, out)
    self.assertEqual((got_depth, got_classes), (depth, num_classes))
    model, variables = self._load(out, depth, num_classes)
    ours = model.apply(variables, self.x)
    with torch.no_grad():
      features, logits = net(torch.from_numpy(np.moveaxis(self.x, -1, 1)))
    self.assertLess(_relative_error(ours["features"], _nhwc(features)), 1e-4)
    # Release channel order -> trainId order.
    order = convert.RELEASE_ORDER[num_classes]
    index = [order.index(n) for n in labels.CLASS_NAMES[num_classes]]
    self.assertLess(_relative_error(ours["logits"],
                                    _nhwc(logits)[..., index]), 1e-4)

  def test_class_permutation(self):
    net = torch_models.randomize(torch_models.DeepLabV2(18, 16), seed=1)
    path = os.path.join(self.dir, "model.weights")
    torch.save({"weights": net.state_dict()}, path)
    variables, _, _ = convert.convert(path, os.path.join(self.dir, "out"))
    names = labels.CLASS_NAMES[16]
    release = convert.RELEASE_ORDER[16]
    for i in range(4):
      theirs = np.transpose(
          net.classifier[0].convs[i][0].weight.detach().numpy(), (2, 3, 1, 0))
      ours = variables["params"]["classifier"][f"conv{i}"]["kernel"]
      # trainId 0 is road, the release's channel 2; sky is 9 vs 0.
      np.testing.assert_array_equal(ours[..., names.index("road")],
                                    theirs[..., release.index("road")])
      np.testing.assert_array_equal(ours[..., names.index("sky")],
                                    theirs[..., 0])
      self.assertEqual(release.index("road"), 2)

  @parameterized.parameters(18, 50)
  @pytest.mark.slow
  def test_imagenet_backbone_matches_pytorch(self, depth):
    # torchvision's ResNets stride on the 3x3 conv.
    net = torch_models.randomize(torch_models.ResNet(depth, "3x3"),
                                 seed=depth + 1)
    path = os.path.join(self.dir, "resnet.pth")
    torch.save(net.state_dict(), path)  # torchvision format, with fc
    out = os.path.join(self.dir, "flax")
    convert.convert(path, out)
    with self.assertRaisesRegex(ValueError, "missing: .*classifier"):
      self._load(out, depth, 19)
    model, variables = self._load(out, depth, 19, allow="classifier",
                                  stride_on="3x3")
    ours = model.apply(variables, self.x)["features"]
    with torch.no_grad():
      theirs = net(torch.from_numpy(np.moveaxis(self.x, -1, 1)))
    self.assertLess(_relative_error(ours, _nhwc(theirs)), 1e-4)
    if depth == 50:  # the stride placement matters for bottlenecks
      caffe_style, _ = self._load(out, depth, 19, allow="classifier")
      other = caffe_style.apply(variables, self.x)["features"]
      self.assertGreater(_relative_error(other, _nhwc(theirs)), 0.05)
    record = checkpointing.read_init_expectations(out)
    self.assertEqual((record["encoding"], record["stride_on"]),
                     ("rgb_imagenet", "3x3"))

  @pytest.mark.slow
  def test_caffe_deeplab_converts_and_matches_pytorch(self):
    # The Caffe-converted DeepLab ResNet: "Scale." keys, a layer5
    # classifier (dropped), strides on the first 1x1 conv.
    net = torch_models.randomize(torch_models.DeepLabV2(50, 19), seed=7)
    state = {"Scale." + k[len("backbone."):]: v
             for k, v in net.state_dict().items() if k.startswith("backbone")}
    for i in range(4):  # Caffe's 21-class classifier, with biases
      state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.zeros(
          21, 2048, 3, 3)
      state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.zeros(21)
    path = os.path.join(self.dir, "DeepLab_resnet_pretrained_init.pth")
    torch.save(state, path)
    out = os.path.join(self.dir, "flax")
    _, depth, _ = convert.convert(path, out)
    self.assertEqual(depth, 50)
    model, variables = self._load(out, 50, 19, allow="classifier")
    # Same logits as PyTorch once the torch head holds the Flax head's
    # (random) initial weights.
    with torch.no_grad():
      for i in range(4):
        kernel = np.asarray(variables["params"]["classifier"][f"conv{i}"][
            "kernel"])
        net.classifier[0].convs[i][0].weight.copy_(
            torch.from_numpy(np.transpose(kernel, (3, 2, 0, 1)).copy()))
      features, logits = net(torch.from_numpy(np.moveaxis(self.x, -1, 1)))
    ours = model.apply(variables, self.x)
    self.assertLess(_relative_error(ours["features"], _nhwc(features)), 1e-4)
    self.assertLess(_relative_error(ours["logits"], _nhwc(logits)), 1e-4)
    record = checkpointing.read_init_expectations(out)
    self.assertIn("converted from caffe weights", record["source"])
    self.assertEqual((record["encoding"], record["stride_on"]),
                     ("bgr_mean", "1x1"))

  def test_config_that_disagrees_with_the_weights_is_refused(self):
    net = torch_models.ResNet(50, "3x3")
    path = os.path.join(self.dir, "resnet.pth")
    torch.save(net.state_dict(), path)
    out = os.path.join(self.dir, "tv")
    convert.convert(path, out)
    config = default_config.get_config()
    config.model.depth = 50
    config.init_from = out
    config.init_allow_missing = "classifier"
    with self.assertRaisesRegex(
        ValueError, r"(?s)expect data.encoding='rgb_imagenet', "
        r"model.stride_on='3x3'.*--config.data.encoding=rgb_imagenet "
        r"--config.model.stride_on=3x3"):
      checkpointing.check_init_expectations(config)
    # Training refuses it before building anything.
    with self.assertRaisesRegex(ValueError, "rgb_imagenet"):
      train.create_train_state(config, None, jax.random.key(0), None)
    config.data.encoding, config.model.stride_on = "rgb_imagenet", "3x3"
    checkpointing.check_init_expectations(config)  # agrees: no error

  def test_missing_torch_gives_the_install_command(self):
    with mock.patch.dict(sys.modules, {"torch": None}):
      with self.assertRaisesRegex(ImportError, r"plca_jax\[convert\]"):
        convert.load_state_dict(os.path.join(self.dir, "any.pth"))

  def test_bad_keys_are_listed(self):
    net = torch_models.DeepLabV2(18, 16)
    state = net.state_dict()
    state["backbone.layer1.0.extra.weight"] = torch.zeros(3)
    path = os.path.join(self.dir, "bad.weights")
    torch.save({"weights": state}, path)
    with self.assertRaisesRegex(ValueError,
                                r"unknown key\(s\): .*layer1\.0\.extra"):
      convert.convert(path, os.path.join(self.dir, "o1"))
    state = net.state_dict()
    del state["backbone.layer2.0.bn1.running_var"]
    state["backbone.layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save({"weights": state}, path)
    with self.assertRaisesRegex(
        ValueError, r"(?s)missing: .*layer2_0/bn1/var.*mis-shaped: "
        r".*layer1_0/conv1/kernel"):
      convert.convert(path, os.path.join(self.dir, "o2"))
    torch.save({"weights": net.state_dict()}, path)
    with self.assertRaisesRegex(ValueError, "--num_classes=19 .* 16-class"):
      convert.convert(path, os.path.join(self.dir, "o3"), num_classes=19)


if __name__ == "__main__":
  absltest.main()
