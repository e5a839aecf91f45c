"""Paired training batches and evaluation batches.

docs/method.md, Data and Evaluation.

Training reads one *global record stream* per run, the same on any number of
processes. Each domain's stream is
  source -> shuffle (reshuffled every epoch) -> repeat -> random
  shorter-edge resize -> flip -> crop/pad
over the whole dataset, seeded by `config.seed` (the two domains get
independent seeds), and the two are zipped element by element (with
class-overlap pairing, each target element with the next K source
elements). grain draws every random decision from the seed and the
element's global position, so record g of the stream is a function of the
seed and g only. Global batch b is records [b*B, (b+1)*B) (B =
`config.train.batch_size`); process p of P loads and augments only records
[b*B + p*B/P, b*B + (p+1)*B/P) of it, which is where
`jax.make_array_from_process_local_data` puts its rows in the global batch.
One process and N processes therefore train on the same global batches.

The training iterator's state (`get_state` / `set_state`) is topology-free:
the number of records consumed (plus the class-overlap pairing table), so a
checkpoint written by N processes resumes with M.

Evaluation: deterministic order; each process takes every
`process_count`-th image; the tail is padded with masked-out elements so
that every process runs the same number of full batches and every image is
seen exactly once.

Batches are dicts of NumPy arrays with the process-local batch first:
"image" uint8 (B, H, W, 3) RGB, "label" uint8 (B, H, W), "skipped" int32
(B,), "has_label" bool (B,), "name" str (B,), "index" int64 (B,) (position in
the dataset), and for evaluation "mask" bool (B,). Pixel encoding
(`transforms.encode`, `config.data.encoding`) happens on the device in the
jitted steps: uint8 batches move 4x fewer bytes, and the pipeline runs
faster (benchmarks/input_pipeline.py).
"""

import math

import grain
import numpy as np

from plca_jax.data import labels as labels_lib
from plca_jax.data import pairing as pairing_lib
from plca_jax.data import synthetic
from plca_jax.data import transforms
from plca_jax.data.sources import cityscapes
from plca_jax.data.sources import cityscapes_tfds
from plca_jax.data.sources import gta5
from plca_jax.data.sources import synthia

DATASETS = ("synthia", "cityscapes", "cityscapes_tfds", "gta5", "synthetic")


def create_source(domain_config, data_config, num_classes):
  """The data source one domain config names.

  Args:
    domain_config: `config.data.source`, `.target` or `.eval`: name, root,
      split, require_labels, and for "synthetic" the domain and num_images.
    data_config: `config.data` (on_error, synthetic image size and seed).
    num_classes: 16 or 19.
  """
  name = domain_config.name
  kwargs = dict(require_labels=domain_config.require_labels,
                on_error=data_config.on_error)
  if name in ("synthia", "cityscapes", "cityscapes_tfds",
              "gta5") and not domain_config.root:
    raise ValueError(f"data root for {name!r} is empty: set "
                     "--config.data.<source|target|eval>.root=/path/to/"
                     f"{name} (see docs/datasets.md, 'Datasets')")
  if name == "synthia":
    return synthia.Synthia(domain_config.root, num_classes, **kwargs)
  if name == "cityscapes":
    return cityscapes.Cityscapes(domain_config.root, domain_config.split,
                                 num_classes, **kwargs)
  if name == "cityscapes_tfds":
    return cityscapes_tfds.CityscapesTFDS(domain_config.root,
                                          domain_config.split, num_classes,
                                          **kwargs)
  if name == "gta5":
    return gta5.GTA5(domain_config.root, num_classes, **kwargs)
  if name == "synthetic":
    return synthetic.SyntheticDomain(
        domain_config.domain, domain_config.num_images,
        split=domain_config.split, height=data_config.synthetic_height,
        width=data_config.synthetic_width, num_classes=num_classes,
        seed=data_config.synthetic_seed,
        with_labels=domain_config.require_labels)
  raise ValueError(f"dataset name {name!r}; expected one of {DATASETS}")


def create_labelled_source(domain_config, data_config, num_classes):
  """`create_source` with the labels required (analysis tools: e.g. the
  training target, which training reads without labels)."""
  domain = domain_config.copy_and_resolve_references()
  domain.require_labels = True
  return create_source(domain, data_config, num_classes)


def local_batch_size(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible"
                     f" by the process count {process_count}")
  return global_batch_size // process_count


class _WithIndex:
  """Adds "index", the element's position in its data source.

  (grain hands `map_with_index` the index seen by the outermost dataset,
  which counts on past the end after `repeat`; hence the modulo.)
  """

  def __init__(self, size):
    self.size = size

  def __call__(self, index, element):
    return {**element, "index": np.int64(index % self.size)}


def train_stream(source, data_config, seed):
  """One domain's infinite global stream of augmented uint8 elements.

  Element g is a function of `seed` and g only (grain seeds each random map
  from the dataset seed and the element's index). Each element carries
  "index", its position in `source`.
  """
  ds = grain.MapDataset.source(source).map_with_index(_WithIndex(len(source)))
  ds = ds.seed(seed).shuffle().repeat()
  ds = ds.random_map(transforms.RandomResizeShorter(data_config.resize_min,
                                                    data_config.resize_max))
  if data_config.flip_prob > 0:
    ds = ds.random_map(transforms.RandomHorizontalFlip(data_config.flip_prob))
  return ds.random_map(transforms.RandomCropPad(*data_config.crop_size))


def _paired(pair):
  return {"source": pair[0], "target": pair[1]}


def _read_options(data_config):
  # grain's default in-process read-ahead is 500 elements (here: batches),
  # which at 730x730 would hold ~13 GB of images; a few batches keep the
  # device fed.
  return grain.ReadOptions(num_threads=data_config.read_threads,
                           prefetch_buffer_size=data_config.prefetch_batches)


STATE_FORMAT = "plca_jax.global_record_stream.v1"


class GlobalBatchIterator:
  """This process's share of the global batches of a global record stream.

  `records` is a grain MapDataset (record g = global position g). Local
  batch k of process p is records [k*B + p*b, k*B + (p+1)*b) with b = B/P.
  The state is the number of records consumed, so it restores on any
  process count whose global batch divides it.
  """

  def __init__(self, records, global_batch, process_index, process_count,
               data_config):
    self._records = records
    self.global_batch = global_batch
    self._local = local_batch_size(global_batch, process_count)
    self._process = (process_index, process_count)
    self._data_config = data_config
    self.position = 0  # global batches yielded
    self._iterator = None

  def _start(self):
    p, count = self._process
    # Sub-batches of b records; global batch k is sub-batches kP .. kP+P-1.
    ds = self._records.batch(self._local, drop_remainder=True)
    ds = ds[self.position * count + p::count]
    ds = ds.to_iter_dataset(_read_options(self._data_config))
    if self._data_config.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._data_config.num_workers))
    self._iterator = iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      self._start()
    batch = next(self._iterator)
    self.position += 1
    return batch

  def get_state(self):
    """JSON-able, topology-free: records consumed of the global stream."""
    return {"format": STATE_FORMAT,
            "records": self.position * self.global_batch,
            "global_batch_size": self.global_batch}

  def set_state(self, state):
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"data state {state!r} is not a {STATE_FORMAT} state")
    if "legacy_batches" in state:  # checkpointing._legacy_data_state
      self.position = int(state["legacy_batches"])
      self._iterator = None
      return
    records = int(state["records"])
    if records % self.global_batch:
      raise ValueError(
          f"the checkpoint's data position is record {records} of the global"
          f" stream (global batch {state['global_batch_size']}), not a "
          f"multiple of this run's config.train.batch_size="
          f"{self.global_batch}: resume with a global batch that divides it")
    self.position = records // self.global_batch
    self._iterator = None  # restarts lazily at the new position

  def start_prefetch(self):
    if self._iterator is None:
      self._start()


def create_train_iterator(config, process_index=0, process_count=1,
                          wrap_source=None):
  """Iterator of this process's paired batches {"source", "target"}.

  Each process gets `config.train.batch_size / process_count` images per
  domain per batch: its share of each global batch of the global record
  stream (module docstring). `wrap_source(domain, source)`, if given, may
  wrap each domain's data source to add fields to its records (a method's
  host-side inputs, e.g. pseudo-labels). With `config.data.pairing =
  "class_overlap"` the iterator is a `pairing.OverlapPairingIterator`
  (batches also carry "pairing"; call its `observe` after each update).
  """
  data = config.data
  if data.pairing not in pairing_lib.PAIRINGS:
    raise ValueError(f"config.data.pairing={data.pairing!r}; expected one "
                     f"of {pairing_lib.PAIRINGS}")
  num_classes = config.model.num_classes
  batch = config.train.batch_size
  local_batch_size(batch, process_count)  # checks divisibility
  sources, streams = [], []
  for k, (name, domain) in enumerate((("source", data.source),
                                      ("target", data.target))):
    sources.append(create_source(domain, data, num_classes))
    if wrap_source is not None:
      sources[-1] = wrap_source(name, sources[-1])
    # Distinct seeds: the two streams are independent random orders.
    streams.append(train_stream(sources[-1], data, config.seed * 2 + k))
  if data.pairing == "random":
    records = grain.experimental.ZipMapDataset(streams).map(_paired)
  else:
    k = data.pairing_candidates
    if k < 1:
      raise ValueError(f"config.data.pairing_candidates={k}; expected >= 1")
    # Target element e goes with source elements e*K .. e*K+K-1.
    candidates = streams[0].batch(k)
    records = grain.experimental.ZipMapDataset(
        [streams[1][:len(candidates)], candidates]).map(_with_candidates)
  iterator = GlobalBatchIterator(records, batch, process_index,
                                 process_count, data)
  if data.pairing == "random":
    return iterator
  # Every process can meet every source image: the whole table.
  source_sets = pairing_lib.class_sets(sources[0], num_classes)
  target_table = None
  if data.pairing_target_classes == "labels":
    if not data.target.require_labels:
      raise ValueError("config.data.pairing_target_classes='labels' needs "
                       "config.data.target.require_labels=True")
    target_table = pairing_lib.class_sets(sources[1], num_classes)
  return pairing_lib.OverlapPairingIterator(
      iterator, source_sets, len(sources[1]),
      mode=data.pairing_target_classes, target_table=target_table)


def _with_candidates(pair):
  return {"target": pair[0], "candidates": pair[1]}


class _EvalElement(grain.transforms.Map):
  """Index -> eval element with a resized image; indices past the end pad."""

  def __init__(self, source, data_config):
    self.source = source
    self.image_size = tuple(data_config.eval_image_size)
    self.label_size = tuple(data_config.eval_label_size)
    self.resize = transforms.ResizeImage(*self.image_size)

  def map(self, index):
    if index >= len(self.source):
      return {"image": np.zeros(self.image_size + (3,), np.uint8),
              "label": np.full(self.label_size, labels_lib.IGNORE, np.uint8),
              "name": "", "has_label": False, "skipped": np.int32(0),
              "mask": False}
    element = self.source[index]
    if element["label"].shape != self.label_size:
      raise ValueError(
          f"evaluation item {element['name']!r} has a {element['label'].shape}"
          f" label; config.data.eval_label_size is {self.label_size} (every "
          "label is kept at full resolution, so all must share it)")
    return {**self.resize.map(element), "mask": True}


def create_eval_iterator(config, process_index=0, process_count=1):
  """(iterator over this process's eval batches, number of real images)."""
  source = create_source(config.data.eval, config.data,
                         config.model.num_classes)
  batch = local_batch_size(config.eval.batch_size, process_count)
  per_step = batch * process_count
  padded = math.ceil(len(source) / per_step) * per_step
  ds = grain.MapDataset.range(padded)[process_index::process_count]
  ds = ds.map(_EvalElement(source, config.data))
  ds = ds.batch(batch, drop_remainder=True).to_iter_dataset()
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.num_workers))
  return iter(ds), len(source)
