r"""DACS (Tranheden et al., WACV 2021), X -> Cityscapes or the demo.

    # The demo (procedural domains, a CPU):
    python -m plca_jax.main --config=configs/dacs.py --workdir=/tmp/dacs
    # The paper setting:
    python -m plca_jax.main --config=configs/dacs.py:gta5 \
      --workdir=DIR --config.data.source.root=/data/GTA5 \
      --config.data.target.root=/data/cityscapes \
      --config.data.eval.root=/data/cityscapes \
      --config.init_from=/data/weights/deeplab_r101_caffe

The argument is "demo" (default), "gta5" (19 classes) or "synthia" (16
classes). Published with DeepLab-V2 R101 (the paper's Tables 1-2): GTA5 ->
Cityscapes 52.14 mIoU, SYNTHIA -> Cityscapes 48.34 mIoU (16 classes).

Paper setting, as the authors' code: batch 2 per domain, 512x512 crops, SGD
2.5e-4 (classifier 10x), momentum 0.9, weight decay 5e-4, poly 0.9 over
250k updates, teacher EMA 0.99, confidence threshold 0.968, ClassMix with
colour jitter and Gaussian blur, evaluation without test-time aggregation.
Where plca_jax deviates: the initialisation is the converted Caffe
DeepLab ResNet-101 of the other configs (the authors start from an MS-COCO
DeepLab-V2); BatchNorm trains with batch statistics over the global batch
and source, mixed and teacher passes are separate (the authors freeze
BatchNorm); both domains are resized to a 512-pixel shorter edge before
cropping (the authors resize GTA5 to 1280x720); the pseudo-label weight is
per target image (the authors': one over the batch) and the teacher's
BatchNorm statistics are an EMA too (the authors' are its own).
`--config.dacs.plca_terms=True` adds PLCA's objective (config.loss) on the
source-target pair, a combination no published work reports.
"""

from configs import default
from configs import demo

SETTINGS = ("demo", "gta5", "synthia")


def get_config(setting="demo"):
  """DACS config; `setting` is "demo", "gta5" or "synthia"."""
  if setting not in SETTINGS:
    raise ValueError(f"config argument {setting!r}; expected one of "
                     f"{list(SETTINGS)}")
  if setting == "demo":
    config = demo.get_config()
    config.method = "dacs"
    config.eval.aggregate = False
    return config
  config = default.get_config()
  default.use_baseline_setting(config, "dacs", setting, num_steps=250_000,
                               schedule_steps=250_000)
  config.train.batch_size = 2
  config.data.crop_size = (512, 512)
  return config
