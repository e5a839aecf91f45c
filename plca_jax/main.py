"""Entry point: python -m plca_jax.main --config=configs/synthia.py --workdir=DIR.

Modes: train_and_eval (default), train, eval (latest checkpoint of WORKDIR,
else `config.init_from`), predict (the same checkpoint's predictions as
Cityscapes PNGs in WORKDIR/predictions, README "Training and evaluation"). Any config key is overridable on the command line,
e.g. `--config.train.num_steps=20`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from plca_jax import console
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import train
from plca_jax import xla

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here "
                    "(a local path, or gs://... for multi-host runs).")
flags.DEFINE_enum("mode", "train_and_eval", ["train_and_eval", "train",
                                             "eval", "predict"],
                  "What to run; predict writes Cityscapes-format PNGs.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed (clusters "
                    "other than Cloud TPU, local multi-process tests).")
flags.DEFINE_integer("num_processes", None, "Processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])

# Set by launch/ scripts on Cloud TPU VMs, where jax.distributed finds the
# coordinator and process layout by itself.
DISTRIBUTED_ENV = "PLCA_JAX_DISTRIBUTED"


def maybe_initialize_distributed():
  """Starts jax.distributed when asked (flags or environment), first thing."""
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  elif os.environ.get(DISTRIBUTED_ENV):
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.train.keep_freed_host_memory:  # before XLA starts its threads
    xla.keep_freed_host_memory()
  # Before the first device use: this process's share of the run's CPU
  # devices (the count that makes losses independent of the process count).
  xla.set_cpu_devices(config.train.cpu_devices, FLAGS.num_processes or 1)
  maybe_initialize_distributed()
  workdir = FLAGS.workdir
  log_file = console.setup(workdir, FLAGS.verbosity)
  logging.info("Full log: %s", log_file)
  logging.info("JAX process %d / %d, local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_devices(),
               extra=console.FILE_ONLY)
  logging.info("Config:\n%s", config, extra=console.FILE_ONLY)
  if (xla.on_cpu() and jax.process_count() > 1 and
      not config.train.cpu_devices and jax.process_index() == 0):
    logging.info("CPU run on %d processes with %d device(s) each: its losses "
                 "match a one-process run only up to float reduction order; "
                 "--config.train.cpu_devices=%d on both makes them equal "
                 "(README \"Reproducibility\").", jax.process_count(),
                 jax.local_device_count(), jax.device_count())
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  if FLAGS.mode == "eval":
    method = methods.get_method(config)
    train.warn_protocol(config, method)
    evaluate.evaluate_checkpoint(config, workdir, method=method)
  elif FLAGS.mode == "predict":
    evaluate.predict_checkpoint(config, workdir,
                                method=methods.get_method(config))
  else:
    train.train_and_evaluate(
        config, workdir, evaluate_during_training=FLAGS.mode != "train")


if __name__ == "__main__":
  app.run(main)
