"""GTA5 -> Cityscapes, the paper's setting (SPEC.md sections 1-5).

    python -m plca_jax.main --config=configs/gta5.py --workdir=DIR \\
      --config.data.source.root=/data/GTA5 \\
      --config.data.target.root=/data/cityscapes \\
      --config.data.eval.root=/data/cityscapes \\
      --config.init_from=/data/weights/resnet101_imagenet

As configs/synthia.py but 19 classes, 28 training epochs under a 30-epoch
poly horizon. Published: 47.7 mIoU (paper), 47.8 for the released model.
"""

from configs import default


def get_config():
  """GTA5 -> Cityscapes config."""
  config = default.get_config()
  config.model.depth = 101
  config.model.num_classes = 19
  config.data.source = default.domain("gta5")
  config.data.target = default.domain("cityscapes", split="train",
                                      require_labels=False)
  config.data.eval = default.domain("cityscapes", split="val")
  config.init_allow_missing = "classifier"
  epoch = default.updates_per_epoch(2975, config.train.batch_size,
                                    config.train.grad_accum_steps)
  config.train.num_steps = 28 * epoch
  config.optim.schedule_steps = 30 * epoch
  config.loss.lovasz_weight = 0.75 * config.train.grad_accum_steps
  return config
