r"""PyTorch checkpoints -> a Flax checkpoint that `config.init_from` accepts.

    python -m plca_jax.convert --from=resnet101-5d3b4d8f.pth --to=/w/r101
    python -m plca_jax.convert --from=synthia.weights --to=/w/plca_synthia

Three input formats, told apart by their keys:
- the Caffe-converted DeepLab ResNet-101 that the release, AdaptSegNet and
  most DeepLab-V2 domain-adaptation code start from (keys `Scale.conv1.
  weight`, `Scale.bn1.running_mean`, `Scale.layer1.0.conv1.weight`, ...,
  and a `Scale.layer5.*` classifier, which is dropped): trained on BGR
  0-255 mean-subtracted input with the stride on the first 1x1 conv,
  exactly the paper configs' network and encoding;
- a torchvision ImageNet ResNet-18/34/50/101 state dict (`conv1.weight`,
  `layer1.0.conv1.weight`, ..., `fc.*`): the backbone, trained on RGB/255
  input normalised by the ImageNet mean/std with the stride on the 3x3
  conv, so it needs `data.encoding="rgb_imagenet"` and
  `model.stride_on="3x3"`; `fc` is dropped;
- the authors' released PLCA models: a dict whose "weights" entry is a
  DeepLab-V2 state dict (`backbone.conv1.weight`, ...,
  `classifier.0.convs.{0..3}.0.weight`, optionally prefixed `module.`). Its
  class channels are in the release's own order (SYNTHIA: sky, building,
  road, ...; GTA5: the same 16 then terrain, truck, train) and are permuted
  into Cityscapes trainId order.

For the two backbones the DeepLab head is left to its initialisation
(configs set `init_allow_missing="classifier"`). The depth is read off the
keys. Every tensor must find its place in the Flax model with the right
shape; unknown, missing or mis-shaped keys are errors that list them.
Output: an orbax StandardCheckpoint of {"params": ..., "batch_stats": ...}
in --to, and beside it `plca_jax_init.json` recording the input encoding
and stride placement the weights expect; training refuses a config that
disagrees (`checkpointing.check_init_expectations`).

Needs PyTorch to read .pth files: `pip install "plca_jax[convert]"`.
"""

import os
import re

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from plca_jax import checkpointing
from plca_jax.data import labels as labels_lib
from plca_jax.models import deeplab_v2

# The release's class order (its label maps), by num_classes.
RELEASE_ORDER_16 = ("sky", "building", "road", "sidewalk", "fence",
                    "vegetation", "pole", "car", "sign", "person", "bicycle",
                    "motorcycle", "light", "rider", "bus", "wall")
RELEASE_ORDER = {16: RELEASE_ORDER_16,
                 19: RELEASE_ORDER_16 + ("terrain", "truck", "train")}

# What each format's weights expect: (data.encoding, model.stride_on).
EXPECTS = {"caffe": ("bgr_mean", "1x1"), "imagenet": ("rgb_imagenet", "3x3"),
           "release": ("bgr_mean", "1x1")}
CAFFE_PREFIX = "Scale."

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "Reading PyTorch checkpoints needs torch: pip install "
        "'plca_jax[convert]' (the CPU build of torch is enough)") from e
  return torch


def load_state_dict(path):
  """(state dict of NumPy arrays, kind): "caffe", "imagenet" or "release".

  Caffe keys lose their "Scale." prefix and the `layer5` classifier.
  """
  torch = _import_torch()
  if not os.path.exists(path):
    raise FileNotFoundError(f"--from={path!r} does not exist")
  obj = torch.load(path, map_location="cpu", weights_only=False)
  kind = "imagenet"
  if isinstance(obj, dict) and "weights" in obj:
    obj, kind = obj["weights"], "release"
  elif isinstance(obj, dict) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (or a dict with "
                     f"'weights'), got {type(obj).__name__}")
  state = {}
  for key, value in obj.items():
    key = key[len("module."):] if key.startswith("module.") else key
    state[key] = value.detach().cpu().numpy() if hasattr(
        value, "detach") else np.asarray(value)
  if any(k.startswith("backbone.") for k in state):
    kind = "release"
  elif any(k.startswith(CAFFE_PREFIX) for k in state):
    plain = [k for k in state if not k.startswith(CAFFE_PREFIX)]
    if plain:
      raise ValueError(f"{path}: keys prefixed {CAFFE_PREFIX!r} (a Caffe-"
                       f"converted DeepLab) mixed with others: {plain[:5]}")
    state = {k[len(CAFFE_PREFIX):]: v for k, v in state.items()
             if not k.startswith(CAFFE_PREFIX + "layer5.")}
    kind = "caffe"
  return state, kind


def infer_architecture(state, kind):
  """(depth, num_classes or None) from the keys and shapes."""
  prefix = "backbone." if kind == "release" else ""
  blocks = []
  for layer in range(1, 5):
    indices = {int(m.group(1)) for k in state
               if (m := re.match(rf"{prefix}layer{layer}\.(\d+)\.", k))}
    blocks.append(len(indices))
  bottleneck = f"{prefix}layer1.0.conv3.weight" in state
  table = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101,
           (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34}
  depth = table.get((bottleneck, tuple(blocks)))
  if depth is None:
    raise ValueError(f"unrecognised ResNet: blocks per layer {blocks}, "
                     f"{'bottleneck' if bottleneck else 'basic'} blocks")
  num_classes = None
  if kind == "release":
    key = "classifier.0.convs.0.0.weight"
    if key not in state:
      raise ValueError(f"released model without {key!r}")
    num_classes = state[key].shape[0]
  return depth, num_classes


def _flax_path(key, kind):
  """(collection, path tuple) of a torch key, or None for dropped keys."""
  if kind == "release":
    m = re.fullmatch(r"classifier\.0\.convs\.(\d)\.0\.weight", key)
    if m:
      return "params", ("classifier", f"conv{m.group(1)}", "kernel")
    if not key.startswith("backbone."):
      return "unknown", (key,)
    key = key[len("backbone."):]
  elif key.startswith("fc."):
    return None
  if key.endswith("num_batches_tracked"):
    return None
  parts = key.split(".")
  module, leaf = parts[:-1], parts[-1]
  if module[0].startswith("layer") and len(module) >= 3:
    block = f"{module[0]}_{module[1]}"
    rest = module[2:]
    if rest[0] == "downsample":
      rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
    names = ["backbone", block, *rest]
  else:
    names = ["backbone", *module]
  if "conv" in names[-1] and leaf == "weight":
    return "params", (*names, "kernel")
  if "bn" in names[-1] and leaf in _BN:
    collection, flax_leaf = _BN[leaf]
    return collection, (*names, flax_leaf)
  return "unknown", (key,)


def convert_state_dict(state, kind):
  """{"params", "batch_stats"} nested dicts of NumPy arrays (Flax layout)."""
  out = {"params": {}, "batch_stats": {}}
  unknown = []
  for key, value in state.items():
    target = _flax_path(key, kind)
    if target is None:
      continue
    collection, path = target
    if collection == "unknown":
      unknown.append(key)
      continue
    if path[-1] == "kernel":  # OIHW -> HWIO
      value = np.transpose(value, (2, 3, 1, 0))
    node = out[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(value, np.float32)
  if unknown:
    raise ValueError(f"{len(unknown)} unknown key(s): " +
                     ", ".join(sorted(unknown)[:20]))
  return out


def permute_classes(variables, num_classes):
  """Reorders the head's output channels from release order to trainIds."""
  order = RELEASE_ORDER[num_classes]
  index = [order.index(name) for name in labels_lib.CLASS_NAMES[num_classes]]
  for conv in variables["params"]["classifier"].values():
    conv["kernel"] = conv["kernel"][..., index]
  return variables


def convert(path, out_dir, num_classes=None):
  """Converts `path` and writes a StandardCheckpoint to `out_dir`.

  Args:
    path: .pth / .weights file (see module doc).
    out_dir: output directory (must not exist yet).
    num_classes: head size of the model the weights will initialise; for
      released models it must match the file, for ImageNet backbones it
      only sizes the (random) head of the checked model.

  Returns:
    (variables, depth, num_classes).
  """
  state, kind = load_state_dict(path)
  depth, file_classes = infer_architecture(state, kind)
  if file_classes is not None:
    if num_classes not in (None, file_classes):
      raise ValueError(f"--num_classes={num_classes} but {path} has a "
                       f"{file_classes}-class head")
    num_classes = file_classes
    if num_classes not in RELEASE_ORDER:
      raise ValueError(f"{path}: {num_classes}-class head; the release's "
                       "class orders are known for 16 and 19 classes")
  num_classes = num_classes or 19
  variables = convert_state_dict(state, kind)
  if kind == "release":
    variables = permute_classes(variables, num_classes)
  model = deeplab_v2.DeepLabV2(num_classes=num_classes, depth=depth)
  init = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))),
                        jax.random.key(0))
  allow = "" if kind == "release" else "classifier"
  checkpointing.check_variables(init, variables, allow, f"--from={path!r}")
  if kind != "release":
    variables["params"].pop("classifier", None)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(out_dir), variables)
  ckpt.wait_until_finished()
  encoding, stride_on = EXPECTS[kind]
  checkpointing.write_init_expectations(
      out_dir, {"format": kind, "encoding": encoding, "stride_on": stride_on,
                "depth": depth, "converted_from": os.path.abspath(path)})
  logging.info("Wrote %s: ResNet-%d (%s weights: %s input, stride on the "
               "%s conv), %s", out_dir, depth, kind, encoding, stride_on,
               f"{num_classes} classes" if kind == "release"
               else "backbone only")
  return variables, depth, num_classes


FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "PyTorch .pth / released .weights file.")
flags.DEFINE_string("to", None, "Output directory (created).")
flags.DEFINE_integer("num_classes", None, "Head size (released models: "
                     "must match the file).")


def main(argv):
  del argv
  _, depth, num_classes = convert(getattr(FLAGS, "from"), FLAGS.to,
                                  FLAGS.num_classes)
  print(f"converted ResNet-{depth} ({num_classes} classes) -> {FLAGS.to}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["from", "to"])
  app.run(main)
