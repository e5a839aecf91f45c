"""Metric writers: clu's TensorBoard + console writer, plus metrics.jsonl.

Every scalar written also goes to WORKDIR/metrics.jsonl as one JSON object
per write, `{"step": 100, "train/loss": 1.23, ...}`, so scripts can read
results without TensorBoard. Only process 0 writes (others just log).
"""

import json
import math

from clu import metric_writers
from clu.metric_writers import interface
from etils import epath


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
      [default, JsonlWriter(epath.Path(workdir) / "metrics.jsonl")])


def read_metrics(workdir):
  """All records of WORKDIR/metrics.jsonl, in order."""
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
