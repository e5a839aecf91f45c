"""SYNTHIA -> Cityscapes, the paper's setting (docs/method.md).

    python -m plca_jax.main --config=configs/synthia.py --workdir=DIR \\
      --config.data.source.root=/data/SYNTHIA \\
      --config.data.target.root=/data/cityscapes \\
      --config.data.eval.root=/data/cityscapes \\
      --config.init_from=/data/weights/deeplab_r101_caffe

DeepLab-V2 ResNet-101, 16 classes, global batch 4 per domain with 2
accumulated micro-batches, 8 epochs of updates (2976) under a 10-epoch poly
horizon (3720). Published: 46.8 mIoU16 / 54.0 mIoU13 (paper), 46.9 for the
released checkpoint. `lovasz_weight` 3.0 is the release's effective beta1
on its README's 2-GPU launch: 0.75 x 2 GPUs x 2 micro-batches
(`default.release_lovasz_weight`; the paper states 0.75; docs/method.md,
Losses).
`init_from` should hold the converted Caffe DeepLab ResNet-101
(docs/datasets.md, "Weights"; the head starts from its random init, hence
`init_allow_missing="classifier"`).
"""

from configs import default


def get_config():
  """SYNTHIA -> Cityscapes config."""
  config = default.get_config()
  default.use_paper_setting(config, "synthia", num_classes=16,
                            train_epochs=8, horizon_epochs=10)
  config.optim.head_lr_mult = 1.0
  return config
