"""Evaluation on the target validation set (docs/method.md, Evaluation).

Images are resized by the input pipeline (730x1460 by default); the network
runs in eval mode; with test-time aggregation (`config.eval.aggregate`)
features <- 0.5 F + 0.5 agg_cos(F), logits from the head, P <- softmax,
P <- 0.5 P + 0.5 agg_kl(P), and P is upsampled (bilinear, half-pixel) to the
full-resolution label; without it the logits are upsampled. One confusion
matrix over the whole set gives per-class IoU, mIoU, mIoU13 (16 classes)
and pixel accuracy.
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from plca_jax import checkpointing
from plca_jax import losses
from plca_jax import metrics as metrics_lib
from plca_jax import models
from plca_jax import sharding
from plca_jax import visualize
from plca_jax import xla
from plca_jax.data import input_pipeline
from plca_jax.data import labels as labels_lib
from plca_jax.data import transforms


def predict(variables, images, *, model, config, label_size):
  """Class scores upsampled to `label_size`: (N, H, W, M).

  Args:
    variables: {"params", "batch_stats"}.
    images: uint8 (N, h, w, 3) RGB network inputs.
  """
  if getattr(model, "reads_images", False):  # e.g. LDR's translate-first
    x = images.astype(jnp.float32)
  else:
    x = transforms.network_input(images, config.data)
  out = model.apply(variables, x)
  if not config.eval.aggregate:
    return losses.upsample_bilinear(out["logits"], label_size)
  alpha = config.eval.alpha
  chunk = losses.chunk_for(config.loss.chunk_size,
                           config.loss.chunk_above_pixels, out["features"])
  precision = config.loss.association_precision
  features = losses.spatial_aggregate(out["features"], "cos", alpha, chunk,
                                      precision)
  logits = model.apply(variables, features, method="classify")
  probs = losses.spatial_aggregate(jax.nn.softmax(logits, axis=-1), "kl",
                                   alpha, chunk, precision)
  return losses.upsample_bilinear(probs, label_size)


def eval_step(variables, batch, *, model, config):
  """Confusion matrix (M, M) int32 and predictions (N, H, W) of one batch."""
  labels = batch["label"]
  scores = predict(variables, batch["image"], model=model, config=config,
                   label_size=labels.shape[1:3])
  predictions = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  confusion = metrics_lib.confusion_matrix(
      labels, predictions, config.model.num_classes, batch["mask"])
  return confusion, predictions.astype(jnp.uint8)


def create_eval_step(config, model, mesh):
  """The jitted `eval_step`; build it once per run (each build recompiles)."""
  return jax.jit(xla.traced_for(mesh, functools.partial(
      eval_step, model=model, config=config)),
                 in_shardings=(sharding.replicated(mesh),
                               sharding.batch_sharding(mesh)),
                 out_shardings=(sharding.replicated(mesh),
                                sharding.batch_sharding(mesh)))


def _local_rows(array):
  """This process's rows of a batch-sharded global array, as NumPy."""
  return np.concatenate([np.asarray(s.data)
                         for s in array.addressable_shards])


def evaluate(config, model, variables, mesh, step=None):
  """Runs the whole evaluation set (`step` from `create_eval_step`, or new).

  Returns:
    (scores dict from `metrics.segmentation_scores`, list of up to
    `config.eval.num_images` (image, label, prediction) NumPy triples from
    process 0's first batch).
  """
  it, total = input_pipeline.create_eval_iterator(
      config, jax.process_index(), jax.process_count())
  sharding.check_batch_divides(config.eval.batch_size, mesh)
  step = step or create_eval_step(config, model, mesh)
  confusion = metrics_lib.ConfusionMatrix(
      matrix=np.zeros((config.model.num_classes,) * 2, np.int64))
  samples = []
  for k, batch in enumerate(it):
    arrays = {key: batch[key] for key in ("image", "label", "mask")}
    matrix, predictions = step(variables, sharding.to_global(arrays, mesh))
    confusion = confusion.merge(
        metrics_lib.ConfusionMatrix(matrix=jax.device_get(matrix)))
    if k == 0 and config.eval.num_images > 0:
      local = _local_rows(predictions)[:config.eval.num_images]
      samples = [(batch["image"][i], batch["label"][i], local[i])
                 for i in range(len(local)) if batch["mask"][i]]
  counted = int(confusion.matrix.sum())
  logging.info("Evaluated %d images (%d labelled pixels).", total, counted)
  names = labels_lib.CLASS_NAMES[config.model.num_classes]
  return metrics_lib.segmentation_scores(confusion.compute(), names), samples


def format_table(scores, num_classes):
  """The per-class IoU table as text."""
  lines = [f"{'class':<14}{'IoU':>8}"]
  for name in labels_lib.CLASS_NAMES[num_classes]:
    lines.append(f"{name:<14}{100 * scores[f'iou/{name}']:8.2f}")
  lines.append(f"{'mIoU':<14}{100 * scores['miou']:8.2f}")
  if "miou13" in scores:
    lines.append(f"{'mIoU13':<14}{100 * scores['miou13']:8.2f}")
  lines.append(f"{'pixel acc.':<14}{100 * scores['pixel_accuracy']:8.2f}")
  return "\n".join(lines)


def evaluate_and_write(config, model, variables, mesh, writer, step,
                       eval_step_fn=None):
  """Evaluates `variables` and writes scalars (eval/...) and image rows."""
  scores, samples = evaluate(config, model, variables, mesh, eval_step_fn)
  logging.info("Evaluation at step %d:\n%s", step,
               format_table(scores, config.model.num_classes))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
  if samples:
    rows = [visualize.prediction_row(image, label, prediction,
                                     config.model.num_classes)
            for image, label, prediction in samples]
    writer.write_images(step, {"eval/input_label_prediction":
                               np.stack(rows)})
  return scores


def _checkpoint_variables(config, workdir, model, mesh, method=None):
  """(variables on the mesh, step) of WORKDIR's latest checkpoint, else of
  `config.init_from` (step 0). With a `method` whose evaluation network is
  not its segmentation network alone (`eval_model`), that network's
  variables from every tree of WORKDIR's checkpoint."""
  init = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, *config.data.eval_image_size, 3))), jax.random.key(0))
  step = checkpointing.latest_step(workdir)
  if method is not None and model is not method.model:
    if step is None:
      raise FileNotFoundError(
          f"config.method={method.name!r} evaluates with networks besides "
          f"the segmentation network; no checkpoint under {workdir}/"
          "checkpoints (config.init_from holds the segmentation network "
          "only)")
    networks, step = checkpointing.read_networks(workdir)
    variables = checkpointing.merge_variables(
        init, method.eval_variables(networks),
        source=f"{workdir} ({method.name} evaluation network)")
    return jax.device_put(variables, sharding.replicated(mesh)), step
  source = workdir if step is not None else config.init_from
  if not source:
    raise FileNotFoundError(
        f"nothing to evaluate: no checkpoint under {workdir}/checkpoints and "
        "config.init_from is empty")
  variables = jax.device_put(checkpointing.load_variables(source, init),
                             sharding.replicated(mesh))
  return variables, step or 0


def _eval_model(config, model, method):
  if method is not None:
    return method.eval_model()
  return model or models.get_model(config)


def prediction_paths(workdir, name):
  """(labelIds PNG, colour PNG) paths of the image named `name`.

  Cityscapes names ("<city>/<city>_<seq>_<frame>") give
  WORKDIR/predictions/<city>/<city>_<seq>_<frame>_leftImg8bit.png, the
  name cityscapesScripts matches; the colour PNG goes to
  WORKDIR/predictions_color/ (in the same folder, cityscapesScripts would
  find two files for one image and stop).
  """
  stem = f"{name}_leftImg8bit.png"
  return (os.path.join(workdir, "predictions", stem),
          os.path.join(workdir, "predictions_color",
                       stem.replace(".png", "_color.png")))


def predict_checkpoint(config, workdir, model=None, method=None):
  """--mode=predict: writes every evaluation image's prediction as a
  Cityscapes labelIds PNG at the label resolution, and a colour PNG.

  Images of `config.data.eval` (set `--config.data.eval.split=test
  --config.data.eval.require_labels=False` for the test split, which has no
  labels). Returns the number of images written.
  """
  model = _eval_model(config, model, method)
  mesh = sharding.create_mesh()
  variables, step = _checkpoint_variables(config, workdir, model, mesh,
                                          method)
  it, total = input_pipeline.create_eval_iterator(
      config, jax.process_index(), jax.process_count())
  sharding.check_batch_divides(config.eval.batch_size, mesh)
  step_fn = create_eval_step(config, model, mesh)
  to_ids = labels_lib.train_to_label_ids(config.model.num_classes)
  written = 0
  for batch in it:
    arrays = {key: batch[key] for key in ("image", "label", "mask")}
    _, predictions = step_fn(variables, sharding.to_global(arrays, mesh))
    local = _local_rows(predictions)
    for i, name in enumerate(batch["name"]):
      if not batch["mask"][i]:
        continue
      ids_path, colour_path = prediction_paths(workdir, str(name))
      for path, image in (
          (ids_path, to_ids[local[i]]),
          (colour_path, labels_lib.colourize(local[i],
                                             config.model.num_classes))):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)
      written += 1
  logging.info("Wrote %d predictions of the checkpoint at step %d (%d "
               "images in the split) to %s/predictions", written, step,
               total, workdir)
  return written


def evaluate_checkpoint(config, workdir, model=None, method=None):
  """Eval-only run: WORKDIR's latest checkpoint, else `config.init_from`.

  `method` is the method that wrote it (`methods.get_method(config)`; its
  `eval_model()` runs), else `model` the segmentation network (default
  `models.get_model(config)`).
  Writes eval/... metrics at the checkpoint's step and prints the table.
  """
  # Imported here: see train.train_and_evaluate (clu's writers import
  # TensorFlow; the evaluation step itself does not need it).
  from plca_jax import writers  # pylint: disable=g-import-not-at-top
  model = _eval_model(config, model, method)
  mesh = sharding.create_mesh()
  variables, step = _checkpoint_variables(config, workdir, model, mesh,
                                          method)
  writer = writers.create_writer(workdir, jax.process_index())
  scores = evaluate_and_write(config, model, variables, mesh, writer, step)
  writer.flush()
  print(format_table(scores, config.model.num_classes))
  return scores
