r"""Multi-run recipes as one command: pixel_contrast's two stages, FDA + MBT.

    # pixel_contrast (demo): stage 1 (grayscale), MBT pseudo-labels of that
    # model, stage 2 (stylised source + entropy + pixel contrast):
    python -m plca_jax.recipes --recipe=pixel_contrast \
      --config=configs/pixel_contrast.py --workdir=/tmp/pc
    # FDA with MBT (demo): three betas, pseudo-labels of their average,
    # the self-training round:
    python -m plca_jax.recipes --recipe=fda_mbt --config=configs/demo.py \
      --config.method=fda --config.eval.aggregate=False --workdir=/tmp/fda

Each run goes to its own folder under WORKDIR (pixel_contrast: stage1/,
pseudo_labels/, stage2/; fda_mbt: beta_<b>/, pseudo_labels/, round/); the
last one is the recipe's result. Every `--config.*` override applies to
every run. Stopped and restarted, a recipe continues where it was: a
finished training is not trained again (its checkpoint is at
`train.num_steps`), an unfinished one resumes from its checkpoint, and
pseudo-labels are written again unless complete (pseudo_labels/COMPLETE).
Runs are the same as the separate commands in docs/methods.md.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from plca_jax import checkpointing
from plca_jax import console
from plca_jax import methods
from plca_jax import run_lock
from plca_jax import train
from plca_jax.methods import mbt

FDA_BETAS = (0.01, 0.05, 0.09)  # the FDA paper's three models
COMPLETE = "COMPLETE"  # written into a pseudo-label folder once it is whole


def _variant(config, **fields):
  """A copy of `config` with dotted fields set, e.g. data__grayscale."""
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _train(config, workdir):
  """Trains `workdir` to `config.train.num_steps` unless it is there."""
  if checkpointing.latest_step(workdir) == config.train.num_steps:
    logging.info("recipe: %s is finished (step %d)", workdir,
                 config.train.num_steps)
    return workdir
  logging.info("recipe: training %s (%s)", workdir, config.method)
  train.train_and_evaluate(config, workdir)
  return workdir


def _pseudo_labels(config, workdirs, out):
  """MBT pseudo-labels of the averaged `workdirs` into `out`, once."""
  if os.path.exists(os.path.join(out, COMPLETE)):
    logging.info("recipe: pseudo-labels in %s are complete", out)
    return out
  logging.info("recipe: MBT pseudo-labels of %s -> %s", ", ".join(workdirs),
               out)
  model = methods.get_method(config).model
  mbt.write_pseudo_labels(config, model, workdirs, out)
  with open(os.path.join(out, COMPLETE), "w") as f:
    f.write("\n".join(workdirs) + "\n")
  return out


def pixel_contrast(config, workdir):
  """Stage 1 (grayscale), its MBT pseudo-labels, stage 2; stage 2's
  workdir."""
  if config.method != "pixel_contrast":
    raise ValueError(f"--recipe=pixel_contrast needs config.method="
                     f"'pixel_contrast'; the config has {config.method!r}")
  stage1 = _variant(config, data__grayscale=True,
                    pixel_contrast__pseudo_label_dir="")
  first = _train(stage1, os.path.join(workdir, "stage1"))
  pseudo = _pseudo_labels(stage1, [first],
                          os.path.join(workdir, "pseudo_labels"))
  stage2 = _variant(config, data__grayscale=False,
                    pixel_contrast__pseudo_label_dir=pseudo)
  return _train(stage2, os.path.join(workdir, "stage2"))


def fda_mbt(config, workdir, betas=FDA_BETAS):
  """FDA with each beta, MBT pseudo-labels of their average, the
  self-training round; the round's workdir."""
  if config.method != "fda":
    raise ValueError(f"--recipe=fda_mbt needs config.method='fda'; the "
                     f"config has {config.method!r}")
  models = [_train(_variant(config, fda__beta=b, fda__pseudo_label_dir=""),
                   os.path.join(workdir, f"beta_{b}")) for b in betas]
  pseudo = _pseudo_labels(_variant(config, fda__pseudo_label_dir=""), models,
                          os.path.join(workdir, "pseudo_labels"))
  return _train(_variant(config, fda__pseudo_label_dir=pseudo),
                os.path.join(workdir, "round"))


RECIPES = {"pixel_contrast": pixel_contrast, "fda_mbt": fda_mbt}

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_enum("recipe", None, sorted(RECIPES), "The recipe to run.")
  config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "One folder per run goes here.")
  flags.DEFINE_bool("force", False, "Take over the workdir's lock from a "
                    "recipe known to be gone (plca_jax.run_lock).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  log_file = console.setup(FLAGS.workdir, FLAGS.verbosity)
  logging.info("Full log: %s", log_file)
  try:
    lock = run_lock.lock_job(FLAGS.workdir, FLAGS.force)
  except run_lock.WorkdirLocked as error:
    logging.error("%s", error)
    sys.exit(3)
  try:
    result = RECIPES[FLAGS.recipe](FLAGS.config, FLAGS.workdir)
  finally:
    if lock is not None:
      lock.release()
  logging.info("recipe %s: result in %s", FLAGS.recipe, result)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["recipe", "config", "workdir"])
  app.run(main)
