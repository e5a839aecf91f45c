"""The embedded default: PLCA on the procedural synthetic domains, on a CPU.

    python -m plca_jax.main --config=configs/demo.py --workdir=/tmp/plca_demo

Trains a small DeepLab-V2 (ResNet-18, width 16) from scratch on the
"source" domain (labelled) adapting to the "target" domain (unlabelled),
and evaluates on held-out target images. No files are needed. Measured
target mIoU: see docs/methods.md, "Demo results". Every PLCA term is on; switch
rungs off with e.g. `--config.loss.use_fass=False`.

Differences from the paper's settings, all for CPU size: a 16-wide ResNet-18
trained from scratch instead of an ImageNet ResNet-101, 96x160 crops of
128x256 images, batch 4 per domain without accumulation, and a larger
learning rate (from-scratch training at the paper's 2.5e-4 barely moves in
a few hundred steps).
"""

from configs import default


def get_config():
  """Demo config; options as in default.py."""
  config = default.get_config()
  config.model.depth = 18
  config.model.width = 16
  config.model.num_classes = 16
  default.use_synthetic_domains(config, num_train=2000, num_eval=100,
                                height=128, width=256)
  config.data.resize_min, config.data.resize_max = 112, 144
  config.data.crop_size = (96, 160)
  config.train.batch_size = 4
  config.train.grad_accum_steps = 1
  config.train.num_steps = 600
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.train.eval_every = 600
  config.optim.base_lr = 0.02
  config.optim.schedule_steps = 600
  config.eval.batch_size = 10
  config.loss.chunk_size = 128
  # Chunked although the images are small: the code path of the paper's
  # 730x730 crops (config.loss.chunk_above_pixels).
  config.loss.chunk_above_pixels = 0
  # Target labels are loaded for the association statistics only
  # ("train/*_correct"): no loss reads them (tests/segmentation_losses_test).
  config.data.target.require_labels = True
  return config
