r"""FDA (and its MBT self-training round), X -> Cityscapes, DeepLab-V2 R101.

    # three models, beta 0.01 / 0.05 / 0.09:
    python -m plca_jax.main --config=configs/fda.py:gta5 --workdir=DIR_01 \
      --config.fda.beta=0.01 --config.data.source.root=/data/GTA5 \
      --config.data.target.root=/data/cityscapes \
      --config.data.eval.root=/data/cityscapes \
      --config.init_from=/data/weights/deeplab_r101_caffe
    # MBT pseudo-labels from the three, then the self-training round:
    python -m plca_jax.methods.mbt --config=configs/fda.py:gta5 \
      --workdirs=DIR_01,DIR_05,DIR_09 --out=PSEUDO ...(same data roots)
    python -m plca_jax.main --config=configs/fda.py:gta5 --workdir=DIR_SL \
      --config.fda.pseudo_label_dir=PSEUDO ...

The argument is "gta5" (19 classes) or "synthia" (16 classes, mIoU13
reported). Published (Yang & Soatto 2020, GTA5 -> Cityscapes): single beta
44.6 mIoU (beta 0.09), MBT 50.45.

As the authors' training code: batch 1 per domain, SGD 2.5e-4 (head 10x),
entropy weight 0.005 with eta 2 from the first update, 512x1024 inputs for
both domains, no flips, evaluation at 512x1024 without test-time
aggregation. The update count (100k under a 150k poly horizon) follows
AdaptSegNet's recipe; it was not checked against FDA's own training
script, which cannot be downloaded here. Deviations: both domains are resized to a 512-pixel
shorter edge and cropped (the authors resize both to 1024x512); BatchNorm
as in the project (docs/method.md, Network).
"""

from configs import default


def get_config(source="gta5"):
  """FDA paper setting; `source` is "gta5" or "synthia"."""
  config = default.get_config()
  default.use_baseline_setting(config, "fda", source,
                               num_steps=100_000, schedule_steps=150_000)
  return config
