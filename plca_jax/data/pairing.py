"""Which source image goes with which target image in a training batch.

`config.data.pairing`:
- "random" (the release): independent shuffled source and target streams
  zipped element by element (`input_pipeline.create_train_iterator`).
- "class_overlap": for each target image the pipeline also draws K source
  candidates (`config.data.pairing_candidates`; the next K elements of the
  shuffled, augmented source stream) and the host picks the candidate that
  shares the most classes with the target's class set, the first on ties.
  Source class sets are precomputed once, from each source image's full
  label map (`class_sets`). The target's class set is
  (`config.data.pairing_target_classes`)
    "pseudo": its predicted classes the last time it was trained on (the
      train step returns them: a class counts if it takes at least
      `pairing_min_share` of the target's output grid). A target not yet
      seen gets its first candidate, i.e. random pairing;
    "labels": its label classes (synthetic data, analysis only).

Determinism: the choice is made on the host at step time, from candidates
that the (deterministic, global) record stream produced and from a class-set
table that changes only through `observe` after each update, so the pairs
depend on nothing but the seed and the training history. The table is
global: every process holds all of it and `observe` records the predicted
classes of the whole global batch (the trainer gathers the target indices
of all processes), so the picks do not depend on the process count. The
table is part of the iterator state that checkpoints save and restore.
Cost: K source images are loaded and augmented per target image.
"""

import base64
import concurrent.futures

from absl import logging
import numpy as np

PAIRINGS = ("random", "class_overlap")
TARGET_CLASSES = ("pseudo", "labels")


def class_set(label, num_classes, min_pixels=1):
  """(M,) bool: classes with at least `min_pixels` pixels in `label`."""
  counts = np.bincount(np.asarray(label).reshape(-1).astype(np.int64),
                       minlength=256)[:num_classes]
  return counts >= min_pixels


def class_sets(source, num_classes, indices=None, min_pixels=1,
               num_threads=8):
  """(len(source), M) bool class sets from the labels of `source`.

  Only `indices` (default: all) are read; the other rows stay False. Reads
  labels only (`source.label`), in `num_threads` threads.
  """
  indices = range(len(source)) if indices is None else indices
  indices = np.asarray(list(indices), np.int64)
  table = np.zeros((len(source), num_classes), bool)
  logging.info("Class sets of %d images of %r", len(indices), source)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    sets = pool.map(lambda i: class_set(source.label(i), num_classes,
                                        min_pixels), indices)
    for i, row in zip(indices, sets):
      table[i] = row
  return table


def choose(candidate_sets, target_set, known=True):
  """The candidate sharing the most classes with `target_set`.

  Args:
    candidate_sets: (K, M) bool class sets of the K source candidates.
    target_set: (M,) bool class set of the target image.
    known: False when the target's classes are not known yet; then the
      first candidate is taken (random pairing).

  Returns:
    (index of the chosen candidate, (K,) int32 shared-class counts).
  """
  shared = np.sum(candidate_sets & target_set[None, :], axis=-1,
                  dtype=np.int32)
  if not known:
    return 0, shared
  return int(np.argmax(shared)), shared  # argmax: first of the best


def pack(table):
  return base64.b64encode(np.packbits(table).tobytes()).decode()


def unpack(text, shape):
  bits = np.frombuffer(base64.b64decode(text), np.uint8)
  return np.unpackbits(bits)[:int(np.prod(shape))].reshape(shape).astype(bool)


class OverlapPairingIterator:
  """Batches {"source", "target", "pairing"} from candidate batches.

  Wraps an iterator (`input_pipeline.GlobalBatchIterator`) whose elements
  are batches {"target": element batch (B, ...) with "index", "candidates":
  element batch (B, K, ...)}. `get_state` / `set_state` (JSON-able dicts)
  keep the class-set table with the stream position for
  `checkpointing.save`.
  """

  def __init__(self, inner, source_sets, num_targets, *, mode,
               target_table=None):
    if mode not in TARGET_CLASSES:
      raise ValueError(f"config.data.pairing_target_classes={mode!r}; "
                       f"expected one of {TARGET_CLASSES}")
    self._inner = inner
    self.mode = mode
    self.source_sets = np.asarray(source_sets, bool)
    self.num_classes = self.source_sets.shape[1]
    if target_table is None:
      self.table = np.zeros((num_targets, self.num_classes), bool)
      self.known = np.zeros((num_targets,), bool)
    else:
      self.table = np.asarray(target_table, bool)
      self.known = np.ones((num_targets,), bool)
    self._pending = []  # target indices yielded since the last `observe`

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._inner)
    target, cands = batch["target"], batch["candidates"]
    rows, shared = [], []
    for b, t in enumerate(target["index"]):
      pick, counts = choose(self.source_sets[cands["index"][b]],
                            self.table[t], bool(self.known[t]))
      rows.append(pick)
      shared.append(counts[pick])
    take = np.arange(len(rows))
    source = {key: np.asarray(value)[take, np.asarray(rows)]
              for key, value in cands.items()}
    self._pending.append(np.asarray(target["index"]))
    return {"source": source, "target": target,
            "pairing": {"shared": np.asarray(shared, np.int32),
                        "candidates": np.asarray(cands["index"]),
                        "known": self.known[target["index"]].copy()}}

  def pending(self):
    """(n,) int64: the target indices yielded since the last `observe`, in
    order (this process's rows of each batch, batch after batch)."""
    if not self._pending:
      return np.zeros((0,), np.int64)
    return np.concatenate(self._pending).astype(np.int64)

  def observe(self, predicted, indices=None):
    """Records the predicted class sets of targets.

    Args:
      predicted: (n, M) bool, one row per entry of `indices`.
      indices: (n,) target indices; default `pending()` (one process). With
        several processes, the global batch's: every process's pending
        indices gathered in the order of the rows of `predicted`.
    Ignored with mode "labels" (the table stays the labels'). Clears the
    pending indices.
    """
    indices = self.pending() if indices is None else np.asarray(indices)
    self._pending = []
    predicted = np.asarray(predicted, bool)
    if predicted.shape != (len(indices), self.num_classes):
      raise ValueError(f"observe: predicted class sets {predicted.shape}, "
                       f"expected {(len(indices), self.num_classes)} (one "
                       "row per target index)")
    if self.mode == "pseudo":
      self.table[indices] = predicted
      self.known[indices] = True

  def get_state(self):
    """JSON-able and topology-free: the inner stream's position and the
    (global) class-set table."""
    if self._pending:
      raise RuntimeError("checkpoint between `next` and `observe`: the "
                         "yielded targets' classes would be lost")
    return {"inner": self._inner.get_state(), "mode": self.mode,
            "shape": list(self.table.shape), "table": pack(self.table),
            "known": pack(self.known)}

  def set_state(self, state):
    if tuple(state["shape"]) != self.table.shape or state["mode"] != self.mode:
      raise ValueError(
          f"checkpointed pairing table {state['shape']} ({state['mode']}) "
          f"does not match this run's {list(self.table.shape)} ({self.mode})"
          ": the target dataset or pairing config changed")
    self.table = unpack(state["table"], self.table.shape)
    self.known = unpack(state["known"], self.known.shape)
    self._pending = []
    self._inner.set_state(state["inner"])

  def start_prefetch(self):
    if hasattr(self._inner, "start_prefetch"):
      self._inner.start_prefetch()
