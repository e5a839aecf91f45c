r"""AdaptSegNet (multi-level), X -> Cityscapes, DeepLab-V2 ResNet-101.

    python -m plca_jax.main --config=configs/adaptsegnet.py:gta5 \
      --workdir=DIR --config.data.source.root=/data/GTA5 \
      --config.data.target.root=/data/cityscapes \
      --config.data.eval.root=/data/cityscapes \
      --config.init_from=/data/weights/deeplab_r101_caffe

The argument is "gta5" (19 classes) or "synthia" (16 classes, mIoU13
reported). Published (Tsai et al. 2018, multi-level): GTA5 42.4 mIoU,
SYNTHIA 46.7 mIoU13.

As the authors' `train_gta2cityscapes_multi.py`: batch 1 per domain, SGD
2.5e-4 (heads 10x), poly over 250k updates stopped at 150k, discriminators
Adam 1e-4 (0.9, 0.99), no flips, evaluation at 512x1024 without test-time
aggregation. Deviations, for the project's one pipeline: both domains are
resized to a 512-pixel shorter edge and cropped to 512x1024 (the authors
resize GTA5 to 1280x720 and Cityscapes to 1024x512 without cropping); the
SYNTHIA setting trains the 16 classes and reports mIoU13 (the authors
train 13); BatchNorm as in the project (docs/method.md, Network).
"""

from configs import default


def get_config(source="gta5"):
  """AdaptSegNet paper setting; `source` is "gta5" or "synthia"."""
  config = default.get_config()
  default.use_baseline_setting(config, "adaptsegnet", source,
                               num_steps=150_000, schedule_steps=250_000)
  return config
