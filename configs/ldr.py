r"""LDR (label-driven reconstruction): the demo, and X -> Cityscapes.

    # The demo domains, one command for both phases (translation networks,
    # then segmentation + reconstruction):
    python -m plca_jax.main --config=configs/ldr.py --workdir=/tmp/ldr
    # The paper's setting, R101 (argument "gta5" or "synthia"):
    python -m plca_jax.main --config=configs/ldr.py:gta5 --workdir=DIR \
      --config.data.source.root=/data/GTA5 \
      --config.data.target.root=/data/cityscapes \
      --config.data.eval.root=/data/cityscapes \
      --config.init_from=/data/weights/deeplab_r101_caffe

The method is `plca_jax/methods/ldr.py` (its deviations are listed there and
in docs/method.md). Evaluation translates the target images with the
translation network first, the method's protocol, and uses no test-time
aggregation.

demo: configs/demo.py's network, data and evaluation; 200 translation
updates, then the demo's 600 segmentation updates (poly horizon 600 for
the segmentation network), so the segmentation network gets as many
updates as in the other methods' demo runs. Small GAN networks (16
channels, 2 residual blocks, 2-layer PatchGANs, 2 scales).

gta5 / synthia: the baselines' DeepLab-V2 R101 setting
(`default.use_baseline_setting`: batch 1 per domain, SGD 2.5e-4 with the
head at 10x, 512x1024, no flips) and the paper's network sizes: CycleGAN's
translation networks (64 channels, 9 residual blocks, 70x70 PatchGANs of 3
layers), a pix2pixHD-sized reconstruction network (64 channels, 9 blocks)
with 3-scale discriminators. The phase lengths (50k translation updates,
then 150k segmentation updates under a 250k poly horizon) are this
project's choice, not read from the authors' code.
"""

from configs import default
from configs import demo


def get_config(setting="demo"):
  """`setting` is "demo", "gta5" or "synthia"."""
  if setting == "demo":
    config = demo.get_config()
    config.method = "ldr"
    config.eval.aggregate = False
    config.ldr.translation_steps = 200
    config.train.num_steps = 800
    config.optim.schedule_steps = 800  # segmentation horizon: 800 - 200
    config.train.eval_every = 800
    return config
  if setting not in ("gta5", "synthia"):
    raise ValueError(f"config argument {setting!r}; expected demo, gta5 or "
                     "synthia")
  config = default.get_config()
  translation = 50_000
  default.use_baseline_setting(config, "ldr", setting,
                               num_steps=translation + 150_000,
                               schedule_steps=translation + 250_000)
  block = config.ldr
  block.translation_steps = translation
  block.gen_channels = block.recon_channels = 64
  block.gen_blocks = block.recon_blocks = 9
  block.disc_channels = block.recon_disc_channels = 64
  block.disc_layers = block.recon_disc_layers = 3
  block.recon_scales = 3
  return config
