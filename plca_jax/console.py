"""A readable console: plca_jax's own lines, warnings, and a full log file.

`setup(workdir, verbosity)` keeps every log record (plca_jax's and the
libraries': orbax, absl, jax, grain, clu, TensorFlow) at INFO in
WORKDIR/logs/process_<i>.log (for a gs:// workdir, written locally and
copied there every minute and at exit), and lets through to the console only
plca_jax's INFO lines (start-up summary, one line per log step, evaluation
tables) and WARNING and above from anyone. `--verbosity=1` (or more) shows
the libraries' INFO lines on the console too.
"""

import atexit
import contextlib
import logging as std_logging
import os
import shutil
import sys
import threading
import time

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

_log_file = None  # this process's log file, once `setup` has run


def log_path(workdir, process_index=0):
  """WORKDIR/logs/process_<i>.log (a local directory for gs:// workdirs)."""
  root = str(workdir)
  if "://" in root:  # Python's FileHandler writes local files only
    root = os.path.join("/tmp", "plca_jax_logs",
                        root.split("://", 1)[1].replace("/", "_"))
  return os.path.join(root, "logs", f"process_{process_index}.log")


UPLOAD_SECONDS = 60


def keep_beside(local, remote, every=UPLOAD_SECONDS):
  """Copies the local log file to `remote` every `every` s and at exit.

  For gs:// workdirs, whose log files are written locally first: the
  copies outlive the VM. Returns a function that stops the copies after a
  last one.
  """
  def upload():
    try:
      epath.Path(remote).parent.mkdir(parents=True, exist_ok=True)
      if "://" in str(remote):  # an object store replaces objects whole
        epath.Path(local).copy(epath.Path(remote), overwrite=True)
      else:  # a reader never sees a half-written copy
        partial = f"{remote}.partial"
        shutil.copyfile(local, partial)
        os.replace(partial, remote)
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("Could not copy the log to %s: %s", remote, error,
                      extra=FILE_ONLY)

  stop = threading.Event()

  def loop():
    while not stop.wait(every):
      upload()

  thread = threading.Thread(target=loop, daemon=True,
                            name="plca_jax-log-upload")
  thread.start()

  def final():
    if not stop.is_set():
      stop.set()
      thread.join()
      upload()
      atexit.unregister(final)
  atexit.register(final)
  return final


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
  global _log_file
  _log_file = path
  if "://" in str(workdir):
    keep_beside(path, str(epath.Path(workdir) / "logs" /
                          os.path.basename(path)))
  return path


@contextlib.contextmanager
def stderr_to_log(linger=0.0):
  """Sends what C and C++ code writes to stderr (fd 2) into the log file.

  For libraries that print past Python's logging: TensorFlow's start-up
  lines (its C++ logging ignores TF_CPP_MIN_LOG_LEVEL before
  absl::InitializeLog), and the callbacks of tensorstore reads still in
  flight when orbax gives up on a damaged checkpoint. When the body raises,
  `linger` seconds are waited before stderr comes back, for such late
  writers. A no-op before `setup` (no log file yet).
  """
  if _log_file is None:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(_log_file, "a") as log:
      os.dup2(log.fileno(), 2)
      try:
        yield
      except BaseException:
        time.sleep(linger)
        raise
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
  finally:
    os.close(saved)


def _is_late_loop_callback(unraisable):
  """Whether `unraisable` (sys.unraisablehook's argument) is a callback
  posting to an asyncio loop that is already closed: what a tensorstore
  read still in flight does when it completes after orbax gave up on a
  damaged checkpoint and closed the loop that awaited it."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and
          str(unraisable.exc_value) == "Event loop is closed"):
    return False
  frame = unraisable.exc_traceback
  while frame is not None:
    if frame.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    frame = frame.tb_next
  return False


class _LateLoopCallbacks:
  """sys.unraisablehook that logs late loop callbacks (INFO, to the log
  file) and hands every other unraisable exception to the hook it
  replaced."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if _is_late_loop_callback(unraisable):
      logging.info("A checkpoint read finished after its restore had "
                   "stopped (%s); ignored.", unraisable.exc_value)
      return
    self.previous(unraisable)


def quiet_late_loop_callbacks():
  """Installs `_LateLoopCallbacks` over the current sys.unraisablehook
  (once), before a checkpoint read: after a failed read, its pending
  reads may complete at any time, from at once to past `stderr_to_log`'s
  linger."""
  if not isinstance(sys.unraisablehook, _LateLoopCallbacks):
    sys.unraisablehook = _LateLoopCallbacks(sys.unraisablehook)


def import_tensorflow_quietly():
  """Imports TensorFlow (if installed) with its start-up lines in the log.

  clu's metric writers and periodic actions import it; importing it here
  first keeps "oneDNN custom operations are on ..." and absl's
  "All log messages before absl::InitializeLog() ..." off the console.
  """
  with stderr_to_log():
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass


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
