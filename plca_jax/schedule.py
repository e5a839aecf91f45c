"""The update on the devices at hand.

One optimizer update is `train.grad_accum_steps` micro-batches of
`train.batch_size` images per domain (global, split over the devices).
`resolve(config, device_count)` gives the config a run on those devices
uses. With `train.auto_split` (the paper configs), a micro-batch that does
not split over the devices is made larger and the accumulation smaller, so
that the update keeps its images: the paper's 2 x 4 runs as 2 x 4 on 1, 2
or 4 devices and as 1 x 8 on 8. More devices than images per update (16
or 32 for the paper's 8) run one micro-batch of one image per device: a
larger update, trained with the learning rate scaled by its size (linear
scaling) and the Lovasz weight of the configured update; where the config
derives the number of updates and the poly horizon from epochs (the paper
configs, configs/default.py), both follow the larger update (fewer updates
for as many epochs). A device count that neither keeps the update nor
exceeds it (e.g. 3 or 6 for 8 images) is refused with the counts that
work. The evaluation batch is rounded up to a multiple of the devices.
Every change is returned as a line for the log.
"""

import copy
import math


def _splits(images, devices):
  """(batch, accumulation) pairs of `images` whose batch splits evenly."""
  return [(images // k, k) for k in range(1, images + 1)
          if images % k == 0 and (images // k) % devices == 0]


def working_device_counts(images, upto=64):
  """Device counts on which an update of `images` keeps its size."""
  return [d for d in range(1, min(images, upto) + 1) if _splits(images, d)]


def resolve(config, device_count):
  """The config a run on `device_count` devices uses, and what changed.

  Idempotent: a resolved config resolves to itself. Field references of the
  config (num_steps, schedule_steps and lovasz_weight derived from the
  batch in configs/default.py) follow the new batch.

  Args:
    config: a ConfigDict (not modified).
    device_count: global number of devices.

  Returns:
    (resolved copy, list of one-line notes for the log).

  Raises:
    ValueError: the batch cannot be split over the devices.
  """
  config = copy.deepcopy(config)
  notes = []
  batch, accum = config.train.batch_size, config.train.grad_accum_steps
  images = batch * accum
  if batch <= 0 or accum <= 0:
    raise ValueError(f"config.train.batch_size={batch} and "
                     f"config.train.grad_accum_steps={accum} must be "
                     "positive")
  steps = config.train.num_steps
  if batch % device_count:
    if not config.train.auto_split:
      raise ValueError(
          f"global batch size {batch} (config.train.batch_size) is not "
          f"divisible by the number of devices {device_count}; set "
          "--config.train.auto_split=True to derive the micro-batches from "
          "the device count, or choose a batch that splits")
    fits = [s for s in _splits(images, device_count) if s[0] >= batch]
    if fits:
      new_batch, new_accum = fits[-1]  # the smallest micro-batch that splits
      notes.append(f"{device_count} devices: {new_accum} micro-batch(es) of "
                   f"{new_batch} images per domain (configured {accum} x "
                   f"{batch}): the same {images} images per update")
    elif device_count > images:
      new_batch, new_accum = device_count, 1
      scale = device_count / images
      config.loss.lovasz_weight = float(config.loss.lovasz_weight)
      config.optim.base_lr = config.optim.base_lr * scale
      notes.append(
          f"{device_count} devices: one micro-batch of {device_count} images "
          f"per domain (1 per device), a larger update than the configured "
          f"{accum} x {batch} = {images}; learning rate x {scale:g} (linear "
          f"scaling) = {config.optim.base_lr:g}, Lovasz weight kept at "
          f"{config.loss.lovasz_weight:g}")
    else:
      raise ValueError(
          f"an update of {images} images per domain ({accum} x {batch}) "
          f"does not split over {device_count} devices; it does on "
          f"{working_device_counts(images)} device(s), and any count above "
          f"{images} runs one image per device with a scaled learning rate")
    config.train.batch_size = new_batch
    config.train.grad_accum_steps = new_accum
    if new_batch * new_accum != images:
      notes.append(f"train.num_steps {steps} -> {config.train.num_steps}, "
                   f"optim.schedule_steps -> {config.optim.schedule_steps}"
                   if config.train.num_steps != steps else
                   f"train.num_steps stays {steps} (set explicitly)")
  if config.eval.batch_size % device_count:
    eval_batch = math.ceil(config.eval.batch_size / device_count) * (
        device_count)
    notes.append(f"evaluation batch {config.eval.batch_size} -> {eval_batch} "
                 f"(a multiple of {device_count} devices)")
    config.eval.batch_size = eval_batch
  return config, notes
