"""CPU-tiny configuration for the tests: synthetic domains, R18 width 4.

    python -m plca_jax.main --config=configs/test.py --workdir=/tmp/plca_test
"""

from configs import default


def get_config():
  """A few seconds per step on one CPU core."""
  config = default.get_config()
  config.model.depth = 18
  config.model.width = 4
  default.use_synthetic_domains(config, num_train=8, num_eval=3, height=32,
                                width=48)
  config.data.resize_min, config.data.resize_max = 32, 40
  config.data.crop_size = (32, 32)
  config.train.batch_size = 2
  config.train.grad_accum_steps = 2
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.eval_every = 4
  config.optim.base_lr = 0.01
  config.optim.schedule_steps = 5
  config.eval.batch_size = 2
  config.eval.num_images = 2
  config.loss.chunk_size = 8
  # Chunked although the images are small: the code path of the paper's
  # 730x730 crops (config.loss.chunk_above_pixels).
  config.loss.chunk_above_pixels = 0
  # XLA's sort in the Lovasz term: an update with the host sort (the "auto"
  # choice on one CPU device) never enters the persistent compilation
  # cache, so every test process compiled every update afresh.
  # tests/segmentation_losses_test.py checks that both sorts agree.
  config.loss.lovasz_sort = "xla"
  return config
