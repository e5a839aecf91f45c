"""A readable console: plca_jax's own lines, warnings, and a full log file.

`setup(workdir, verbosity)` keeps every log record (plca_jax's and the
libraries': orbax, absl, jax, grain, clu, TensorFlow) at INFO in
WORKDIR/logs/process_<i>.log, and lets through to the console only
plca_jax's INFO lines (start-up summary, one line per log step, evaluation
tables) and WARNING and above from anyone. `--verbosity=1` (or more) shows
the libraries' INFO lines on the console too.
"""

import logging as std_logging
import os

from absl import logging
from etils import epath
import jax

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
FORMAT = "%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s"


class ConsoleFilter(std_logging.Filter):
  """Passes WARNING+ and INFO records from plca_jax's own files."""

  def __init__(self, verbosity=0):
    super().__init__()
    self.verbosity = verbosity

  def filter(self, record):
    if record.levelno >= std_logging.WARNING or self.verbosity >= 1:
      return True
    if getattr(record, "file_only", False):
      return False
    return os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


FILE_ONLY = {"file_only": True}  # logging.info(..., extra=FILE_ONLY)


def log_path(workdir, process_index=0):
  """WORKDIR/logs/process_<i>.log (a local directory for gs:// workdirs)."""
  root = str(workdir)
  if "://" in root:  # Python's FileHandler writes local files only
    root = os.path.join("/tmp", "plca_jax_logs",
                        root.split("://", 1)[1].replace("/", "_"))
  return os.path.join(root, "logs", f"process_{process_index}.log")


def setup(workdir, verbosity=0):
  """Filters the console handler and adds the log file; returns its path.

  Call after `jax.distributed.initialize` (the file is per process).
  """
  console = logging.get_absl_handler()
  console.addFilter(ConsoleFilter(verbosity))
  path = log_path(workdir, jax.process_index())
  epath.Path(os.path.dirname(path)).mkdir(parents=True, exist_ok=True)
  root = std_logging.getLogger()
  file_handler = std_logging.FileHandler(path)
  file_handler.setLevel(std_logging.INFO)
  file_handler.setFormatter(std_logging.Formatter(FORMAT))
  root.addHandler(file_handler)
  root.setLevel(min(root.level or std_logging.INFO, std_logging.INFO))
  # TensorFlow's C++ logging (imported by TFDS / TensorBoard writers).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  return path


def format_duration(seconds):
  """e.g. 7m13s, 2h05m, 41s."""
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


DIAGNOSTIC_SUFFIXES = ("_consistent", "_reached", "_correct", "grad_norm",
                       "learning_rate", "skipped_files",
                       "pairing_shared_classes", "pairing_known_targets")


def progress_line(step, num_steps, steps_per_sec, values, max_terms=6):
  """One line per log step: step, rate, ETA, loss and the main terms.

  `steps_per_sec` None (the first update, which compiles): no rate yet.
  """
  if steps_per_sec:
    speed = (f"{steps_per_sec:.2f} steps/s | ETA "
             f"{format_duration((num_steps - step) / steps_per_sec)}")
  else:
    speed = "compiled"
  terms = [(k.removeprefix("train/"), v) for k, v in values.items()
           if k != "train/loss" and not k.endswith(DIAGNOSTIC_SUFFIXES)]
  text = " ".join(f"{k} {v:.4g}" for k, v in terms[:max_terms])
  return (f"step {step}/{num_steps} | {speed} | "
          f"loss {values['train/loss']:.4f} | {text}")
