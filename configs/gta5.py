"""GTA5 -> Cityscapes, the paper's setting (docs/method.md).

    python -m plca_jax.main --config=configs/gta5.py --workdir=DIR \\
      --config.data.source.root=/data/GTA5 \\
      --config.data.target.root=/data/cityscapes \\
      --config.data.eval.root=/data/cityscapes \\
      --config.init_from=/data/weights/deeplab_r101_caffe

As configs/synthia.py but 19 classes, 28 training epochs under a 30-epoch
poly horizon. Published: 47.7 mIoU (paper), 47.8 for the released model.
"""

from configs import default


def get_config():
  """GTA5 -> Cityscapes config."""
  config = default.get_config()
  default.use_paper_setting(config, "gta5", num_classes=19,
                            train_epochs=28, horizon_epochs=30)
  return config
