"""SYNTHIA -> Cityscapes as in the 2021 replication: ResNet-18, batch 4, 30K.

    python -m plca_jax.main --config=configs/synthia_r18.py --workdir=DIR \\
      --config.data.source.root=/data/SYNTHIA \\
      --config.data.target.root=/data/cityscapes \\
      --config.data.eval.root=/data/cityscapes \\
      --config.init_from=/data/weights/resnet18_imagenet

Global batch 4 per domain, no accumulation on one device (so the
release-equivalent Lovasz weight is 0.75 x W x K = 0.75 x 1 x 1), 30,000
updates with the poly horizon at 30,000.
The replication reported 18.7 (source only) -> 19.32 (+lov) -> 20.32
(+fass) mIoU16. There is no Caffe ResNet-18: `init_from` is torchvision's
ImageNet ResNet-18 converted (docs/datasets.md, "Weights"), trained on
RGB/255 input
normalised by the ImageNet mean/std, hence `data.encoding="rgb_imagenet"`
(basic blocks stride their first 3x3 conv in both conventions).
"""

from configs import synthia


def get_config():
  """ResNet-18 replication config."""
  config = synthia.get_config()
  config.model.depth = 18
  config.train.batch_size = 4
  config.train.grad_accum_steps = 1
  config.train.num_steps = 30_000
  config.optim.schedule_steps = 30_000
  config.loss.lovasz_weight = 0.75
  config.data.encoding = "rgb_imagenet"  # torchvision's ResNet-18 weights
  return config
