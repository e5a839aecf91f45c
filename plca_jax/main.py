"""Entry point: python -m plca_jax.main --config=configs/synthia.py --workdir=DIR.

Modes: train_and_eval (default), train, eval (latest checkpoint of WORKDIR,
else `config.init_from`), predict (the same checkpoint's predictions as
Cityscapes PNGs in WORKDIR/predictions, docs/training.md). Any config key
is overridable on the command line,
e.g. `--config.train.num_steps=20`.
"""

import difflib
import importlib.util
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from plca_jax import console
from plca_jax import evaluate
from plca_jax import methods
from plca_jax import run_lock
from plca_jax import schedule
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
flags.DEFINE_bool("force", False, "Take over the workdir's lock (RUN_LOCK) "
                  "from a run known to be gone; see plca_jax.run_lock.")
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


def config_keys(config, prefix=""):
  """Every dotted key of a ConfigDict, e.g. "train.num_steps"."""
  keys = []
  for name, value in config.items():
    keys.append(prefix + name)
    if hasattr(value, "items"):
      keys.extend(config_keys(value, f"{prefix}{name}."))
  return keys


def _config_value(config, key):
  for name in key.split("."):
    config = config[name]
  return config


def explain_flag_error(error, argv, config):
  """One line for a command-line error: the key, the value, the fix.

  Args:
    error: what parsing raised.
    argv: the command line.
    config: the loaded config, or None if the file did not load.
  """
  text = str(error)
  config_arg = _flag_value(argv, "config")
  if config is None and config_arg is not None and (
      "Failed loading config file" in text or "not available" in text):
    tried = os.path.abspath(config_arg.split(":", 1)[0])
    return (f"config file {config_arg} could not be loaded (tried {tried}: "
            f"{'no such file' if not os.path.exists(tried) else text})")
  if config is not None:
    keys = config_keys(config)
    for arg in argv:
      match = re.match(r"--config\.([^=]+)(?:=(.*))?$", arg)
      if not match:
        continue
      key, value = match.groups()
      if key not in keys:
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        return (f"unknown config key {key!r} in {arg}" +
                (f"; closest: {', '.join(close)}" if close else ""))
      if f"--config.{key}=" in text:
        expected = type(_config_value(config, key)).__name__
        return (f"bad value {value!r} for config key {key!r}: expected "
                f"{expected} (the config has "
                f"{_config_value(config, key)!r})")
  return text.splitlines()[0] if text else type(error).__name__


def _flag_value(argv, name):
  """The last `--NAME=VALUE` of the command line (absl's choice), or None."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  return values[-1] if values else None


def _load_config(config_arg):
  """The config of `--config=PATH[:ARG]` without overrides, or None."""
  if not config_arg:
    return None
  path, _, arg = config_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("plca_jax_user_config",
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


def parse_flags(argv):
  """absl's flag parsing, with config errors in one line on stderr.

  The traceback goes to WORKDIR/logs/process_0.log when --workdir is given.
  """
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # config_flags raises a failed load on first use
    return rest
  except Exception as error:  # pylint: disable=broad-except
    config = _load_config(_flag_value(argv, "config"))
    message = explain_flag_error(error, argv, config)
    workdir = _flag_value(argv, "workdir")
    where = ""
    if workdir:
      path = console.log_path(workdir)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "a") as f:
        f.write(f"Command line: {' '.join(argv)}\n{traceback.format_exc()}")
      where = f" (traceback in {path})"
    sys.stderr.write(f"plca_jax.main: {message}{where}\n")
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  # Before XLA starts its threads; CPU-tuned, so for the CPU backend only.
  if xla.select_platform() == "cpu" and config.train.keep_freed_host_memory:
    xla.keep_freed_host_memory()
  # Before the first device use: this process's share of the run's CPU
  # devices (the count that makes losses independent of the process count).
  xla.set_cpu_devices(config.train.cpu_devices, FLAGS.num_processes or 1)
  maybe_initialize_distributed()
  workdir = FLAGS.workdir
  log_file = console.setup(workdir, FLAGS.verbosity)
  logging.info("Full log: %s", log_file)
  config, notes = schedule.resolve(config, jax.device_count())
  for note in notes:
    logging.info("%s", note)
  cache = xla.use_compilation_cache(config.train.get("compilation_cache", ""),
                                    workdir)
  if cache:
    logging.info("Compilation cache: %s", cache, extra=console.FILE_ONLY)
  training = FLAGS.mode in ("train_and_eval", "train")
  try:
    lock = run_lock.lock_job(workdir, FLAGS.force) if training else None
  except run_lock.WorkdirLocked as error:
    logging.error("%s", error)
    sys.exit(3)
  try:
    run(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def run(config, workdir):
  """Everything after the workdir is ours: config.json, then the mode."""
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
  app.run(main, flags_parser=parse_flags)
