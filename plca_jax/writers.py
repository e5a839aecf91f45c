"""Metric writers: clu's TensorBoard + console writer, plus metrics.jsonl.

Every scalar written also goes to WORKDIR/metrics.jsonl as one JSON object
per write, `{"step": 100, "train/loss": 1.23, ...}`, so scripts can read
results without TensorBoard. Only process 0 writes (others just log).

A run resumed from checkpoint S computes steps S+1... again; what an
earlier run wrote for them (it stopped before its next checkpoint, or a
damaged checkpoint was skipped) is moved to WORKDIR/set_aside/ first
(`set_aside_after`), so metrics.jsonl and the event files hold each step
once.
"""

import io
import json
import math
import time

from absl import logging

from plca_jax import console

console.import_tensorflow_quietly()  # before clu, which imports it
# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath
# pylint: enable=g-import-not-at-top,wrong-import-position

METRICS_FILE = "metrics.jsonl"


class JsonlWriter(interface.MetricWriter):
  """Appends scalars as JSON lines; other summary kinds are ignored."""

  def __init__(self, path):
    self.path = path
    # epath: local files, or gs:// through TensorFlow's filesystem (which
    # implements append on GCS by rewriting the object).
    self._file = epath.Path(path).open("a")

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      # JSON has no NaN/Inf; keep them readable as strings.
      record[name] = value if math.isfinite(value) else str(value)
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def create_writer(workdir, process_index=0):
  """TensorBoard events + console (+ metrics.jsonl) on process 0."""
  if process_index > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter(
      [default, JsonlWriter(epath.Path(workdir) / METRICS_FILE)])


SET_ASIDE_DIR = "set_aside"


def set_aside_after(workdir, step):
  """Moves the records of steps after `step` out of the workdir's metrics.

  metrics.jsonl keeps its records up to `step`; the later lines go to
  WORKDIR/set_aside/after_<step>.<time>/metrics.jsonl. An event file with
  events after `step` is copied there whole and rewritten without them
  (TensorBoard then shows one value per step: the resumed run's).

  Returns:
    the number of metrics.jsonl records and events set aside.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer import record_writer
  # pylint: enable=g-import-not-at-top
  root = epath.Path(workdir)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  aside = root / SET_ASIDE_DIR / f"after_{step}.{stamp}"
  moved = 0
  metrics = root / METRICS_FILE
  if metrics.exists():
    lines = metrics.read_text().splitlines(keepends=True)
    later = [l for l in lines if l.strip() and json.loads(l)["step"] > step]
    if later:
      aside.mkdir(parents=True, exist_ok=True)
      (aside / METRICS_FILE).write_text("".join(later))
      kept = [l for l in lines
              if not l.strip() or json.loads(l)["step"] <= step]
      _replace(metrics, "".join(kept).encode())
      moved += len(later)
  for events in sorted(root.glob("events.out.tfevents.*")):
    records = list(event_file_loader.RawEventFileLoader(str(events)).Load())
    keep = [r for r in records if not _summary_after(r, step, event_pb2)]
    if len(keep) == len(records):
      continue
    aside.mkdir(parents=True, exist_ok=True)
    events.copy(aside / events.name)
    buffer = io.BytesIO()
    writer = record_writer.RecordWriter(buffer)
    for record in keep:
      writer.write(record)
    _replace(events, buffer.getvalue())
    moved += len(records) - len(keep)
  if moved:
    logging.warning("Resuming from step %d: %d metric records of later steps "
                    "(written by an earlier run) moved to %s.", step, moved,
                    aside)
  return moved


def _summary_after(record, step, event_pb2):
  event = event_pb2.Event.FromString(record)
  return event.HasField("summary") and event.step > step


def _replace(path, data):
  """Writes `data` to `path` through a temporary file and a rename."""
  temporary = path.parent / (path.name + ".tmp")
  temporary.write_bytes(data)
  temporary.replace(path)


def read_metrics(workdir):
  """All records of WORKDIR/metrics.jsonl, in order."""
  text = (epath.Path(workdir) / METRICS_FILE).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
