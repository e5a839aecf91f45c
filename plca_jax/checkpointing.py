"""orbax checkpoints: train state + data iterator, and `init_from` loading.

Layout: WORKDIR/checkpoints/<step>/{state,data_stream}. `state` is the
TrainState (params, BatchNorm statistics, optimizer state, step, and under
"extra" the same for each other network of the method, e.g. a
discriminator); `data_stream` is the training iterator's topology-free state
(JSON, written once: records consumed of the global record stream, and the
class-overlap pairing table), so a resumed run sees exactly the batches it
would have seen, on any number of processes. Checkpoints written before
methods had other networks (no "extra") restore into a state whose "extra"
is empty. Checkpoints of the older per-process data format (`data/
process_<i>-of-<n>.json`, grain's handler) restore with the same process
count (`_legacy_data_state`).

`init_from` points at either a plca_jax workdir (its latest checkpoint's
params and statistics are used) or a directory holding a StandardCheckpoint
of `{"params": ..., "batch_stats": ...}` as `python -m plca_jax.convert`
writes. Loading merges into the freshly initialised variables and fails on
missing, unexpected or mis-shaped leaves, unless `allow_missing` (a regex
over "/"-joined paths) names leaves that may keep their initial values.
"""

import json
import re
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from plca_jax import console
from plca_jax.data import input_pipeline
from plca_jax.data import pairing as pairing_lib


def workdir_path(workdir):
  """epath of a workdir: local paths made absolute, gs:// etc. kept.

  Multi-host runs need a workdir every host sees (e.g. a GCS bucket) for
  the checkpoints.
  """
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.absolute()


def create_manager(workdir, keep=3):
  """CheckpointManager over WORKDIR/checkpoints with state and data items."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(workdir_path(workdir) / "checkpoints",
                               options=options,
                               item_names=("state", DATA_ITEM))


def latest_step(workdir):
  """The step of WORKDIR's latest checkpoint, or None."""
  with create_manager(workdir) as manager:
    return manager.latest_step()


DATA_ITEM = "data_stream"
LEGACY_DATA_ITEM = "data"  # grain's per-process files, before the stream


def save(manager, step, state, data_iterator):
  """Saves (asynchronously) the state and the iterator at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      **{DATA_ITEM: ocp.args.JsonSave(data_iterator.get_state())}))


def _saved_tree(manager, step):
  """The metadata tree of the state saved at `step` (no arrays read)."""
  path = epath.Path(manager.directory) / str(step) / "state"
  return ocp.StandardCheckpointHandler().metadata(path)


class DamagedCheckpoint(Exception):
  """A checkpoint that cannot be read: its step, the file, the cause."""

  def __init__(self, step, path, cause):
    super().__init__(f"checkpoint {step}: {path}: {cause}")
    self.step, self.path, self.cause = step, path, cause


# Messages of the errors that mean a file of the checkpoint is missing,
# truncated or corrupt (tensorstore's status codes, orbax's and Python's
# wording). Anything else (a config that does not match the saved shapes,
# a permission or network error) is not a damaged checkpoint and is raised.
_DAMAGE = re.compile(r"NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|not found|does not "
                     r"exist|corrupt|Error decoding|Unexpected end|"
                     r"Expecting value|truncated", re.IGNORECASE)


def _damage(step, directory, error):
  """A DamagedCheckpoint for `error` if it is one, else None."""
  if not isinstance(error, (FileNotFoundError, json.JSONDecodeError)) and (
      not _DAMAGE.search(str(error))):
    return None
  text = str(error)
  paths = re.findall(r'"((?:/|gs://)[^"\\]+)"', text)
  path = getattr(error, "filename", None) or (paths[-1] if paths else None)
  line = next((l.strip() for l in text.splitlines() if l.strip()),
              type(error).__name__)
  if len(line) > 160:
    line = line[:157] + "..."
  return DamagedCheckpoint(step, path or directory,
                           f"{type(error).__name__}: {line}")


def _read_checked(step, directory, read):
  """`read()`, with file damage raised as DamagedCheckpoint.

  What tensorstore's callbacks print to stderr after a failed read goes
  to the log file, not the console, and so do the reads still pending
  that complete later (`console.quiet_late_loop_callbacks`).
  """
  console.quiet_late_loop_callbacks()  # before: they may come at once
  try:
    with console.stderr_to_log(linger=0.5):
      return read()
  except Exception as error:  # pylint: disable=broad-except
    damage = _damage(step, directory, error)
    if damage is None:
      raise
    raise damage from error


def restore(manager, step, abstract_state, data_iterator):
  """Restores `step` into `abstract_state` (with shardings) and the iterator.

  Raises ValueError naming both sets when the saved networks differ from
  the method's (e.g. resuming an adaptsegnet workdir with another method),
  DamagedCheckpoint when a file of the checkpoint is missing or unreadable.

  Returns:
    the restored state; `data_iterator` is restored in place.
  """
  directory = epath.Path(manager.directory) / str(step)
  required = [directory / "state" / "_METADATA"]
  if (directory / DATA_ITEM).exists():
    required.append(directory / DATA_ITEM / "metadata")
  for path in required:
    if not path.exists():
      raise DamagedCheckpoint(step, path, "missing")
  saved = _read_checked(step, directory, lambda: _saved_tree(manager, step))
  target = abstract_state
  if "extra" not in saved:  # written before methods had other networks
    target = {k: getattr(abstract_state, k) for k in sorted(saved.keys())}
  saved_networks = sorted(saved.get("extra") or {})
  wanted = sorted(abstract_state.extra)
  if saved_networks != wanted:
    raise ValueError(
        f"checkpoint {manager.directory}/{step} holds the networks "
        f"{['segmentation', *saved_networks]} but the method trains "
        f"{['segmentation', *wanted]}: resume with the config.method it was "
        "written with, or use another workdir")
  if (directory / DATA_ITEM).exists():
    items = _read_checked(step, directory, lambda: manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            **{DATA_ITEM: ocp.args.JsonRestore()})))
    data_iterator.set_state(items[DATA_ITEM])
  else:
    data_state = _legacy_data_state(directory / LEGACY_DATA_ITEM)
    items = _read_checked(step, directory, lambda: manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))))
    data_iterator.set_state(data_state)
  restored = items["state"]
  if isinstance(target, dict):
    return abstract_state.replace(**restored)
  return restored


DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/, never read


def restore_latest(manager, abstract_state, data_iterator):
  """Restores the newest readable checkpoint, falling back past damage.

  A checkpoint that cannot be read is reported (its step, the file, the
  cause) and, once an older one has been restored, moved to
  WORKDIR/damaged_checkpoints/ (not deleted; later saves of its step do
  not collide with it). Nothing is moved when no checkpoint can be read.

  Returns:
    (state, step), or (None, None) when the workdir has no checkpoint.

  Raises:
    RuntimeError listing every checkpoint tried, when none can be read.
  """
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = restore(manager, step, abstract_state, data_iterator)
    except DamagedCheckpoint as error:
      logging.warning("Checkpoint %d of %s cannot be read: %s: %s. Trying "
                      "the previous one.", step, manager.directory,
                      error.path, error.cause)
      damaged.append(error)
      continue
    if damaged:
      _move_aside(manager, [d.step for d in damaged])
      logging.warning(
          "Resumed from checkpoint %d instead of the damaged %s; the "
          "damaged one(s) are in %s.", step,
          ", ".join(str(d.step) for d in damaged),
          epath.Path(manager.directory).parent / DAMAGED_DIR)
    return state, step
  if damaged:
    raise RuntimeError(
        f"no readable checkpoint in {manager.directory}; tried:\n" +
        "\n".join(f"  {d}" for d in damaged) +
        "\nNothing was moved or deleted. Move the damaged step folders "
        "elsewhere to start this workdir afresh, or restore them from a "
        "copy.")
  return None, None


def _move_aside(manager, steps):
  """Moves checkpoint steps to WORKDIR/damaged_checkpoints (process 0)."""
  root = epath.Path(manager.directory)
  target = root.parent / DAMAGED_DIR
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      (root / str(step)).rename(target / f"{step}.{stamp}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("plca_jax damaged checkpoints moved")
  manager.reload()


def _legacy_position(inner, path):
  """Batches consumed, from a grain iterator state of the old format."""
  if "next_index" in inner:
    return int(inner["next_index"])
  if "iterators_in_use_states" in inner:  # mp_prefetch: one per worker
    return sum(int(w["next_index"]) for w in inner["iterators_in_use_states"])
  raise ValueError(f"{path}: unknown grain iterator state {sorted(inner)}; "
                   "resume this workdir with the plca_jax version that "
                   "wrote it, or start a new workdir")


def _legacy_data_state(directory):
  """The global-stream state equivalent to an old per-process data item.

  The old format (grain's handler) wrote one file per process, each with
  that process's position in its own shard of the data. Each process had
  consumed one local batch per global batch, so the global position is
  that count times the global batch; from there the run continues on the
  global record stream (a different order of records than the old
  pipeline would have drawn, logged as a warning). The class-overlap table
  is the union of the processes' tables. Needs the process count that
  wrote it: the old positions belong to that count's sharding.
  """
  count = jax.process_count()
  files = sorted(directory.glob("process_*-of-*.json")) if (
      directory.exists()) else []
  if not files:
    raise ValueError(f"checkpoint {directory.parent} has neither "
                     f"{DATA_ITEM}/ nor per-process {LEGACY_DATA_ITEM}/ "
                     "files: it is incomplete")
  written_by = {int(f.name.rsplit("-of-", 1)[1].removesuffix(".json"))
                for f in files}
  if written_by != {count}:
    raise ValueError(
        f"checkpoint {directory.parent} holds the data position in the "
        f"per-process format of plca_jax before the global record stream, "
        f"written by {sorted(written_by)} process(es); this run has {count}. "
        "That format records each process's position in its own shard, "
        "which only the same process count can continue: resume with "
        f"{sorted(written_by)[0]} process(es) (later checkpoints are "
        "topology-free), or start a new workdir")
  states = [json.loads(f.read_text()) for f in files]
  own = states[jax.process_index()]
  pairing = "inner" in own and "table" in own
  path = files[jax.process_index()]
  batches = _legacy_position(own["inner"] if pairing else own, path)
  logging.warning(
      "%s: data position in the old per-process format (%d batches per "
      "process); continuing on the global record stream from global batch "
      "%d, whose record order differs from the old pipeline's.",
      directory, batches, batches)
  stream = {"format": input_pipeline.STATE_FORMAT, "legacy_batches": batches}
  if not pairing:
    return stream
  shape = tuple(own["shape"])
  table = np.zeros(shape, bool)
  known = np.zeros(shape[:1], bool)
  for state in states:
    known_p = pairing_lib.unpack(state["known"], shape[:1])
    table[known_p] = pairing_lib.unpack(state["table"], shape)[known_p]
    known |= known_p
  if own["mode"] == "labels":
    table = pairing_lib.unpack(own["table"], shape)
  return {"inner": stream, "mode": own["mode"], "shape": list(shape),
          "table": pairing_lib.pack(table), "known": pairing_lib.pack(known)}


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _read_state(checkpoints, what):
  """(the latest saved state as NumPy trees, its step) of a checkpoints
  directory."""
  with ocp.CheckpointManager(checkpoints,
                             item_names=("state",)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{what}: no checkpoint in {checkpoints}")
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  logging.info("%s: %s step %d", what, checkpoints, step)
  return state, step


def read_networks(workdir):
  """{tree: {"params", "batch_stats"}} of every network in WORKDIR's latest
  checkpoint (the segmentation network as "segmentation"), and its step."""
  checkpoints = workdir_path(workdir) / "checkpoints"
  state, step = _read_state(checkpoints, f"workdir {workdir!r}")
  networks = {"segmentation": {"params": state["params"],
                               "batch_stats": state["batch_stats"]}}
  for name, tree in (state.get("extra") or {}).items():
    networks[name] = {"params": tree["params"],
                      "batch_stats": tree.get("batch_stats") or {}}
  return networks, step


def _read_variables(path):
  """{"params", "batch_stats"} as NumPy from a workdir or a checkpoint dir."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"init_from={path!r} does not exist")
  checkpoints = workdir_path(path) / "checkpoints"
  if checkpoints.is_dir():
    state, _ = _read_state(checkpoints, f"init_from={path!r}")
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
  restored = ocp.StandardCheckpointer().restore(workdir_path(path))
  if not isinstance(restored, dict) or "params" not in restored:
    raise ValueError(f"init_from={path!r} holds no 'params' tree; expected a "
                     "plca_jax workdir or a directory written by "
                     "`python -m plca_jax.convert`")
  return {"params": restored["params"],
          "batch_stats": restored.get("batch_stats", {})}


def check_variables(init, loaded, allow_missing="", source="init_from"):
  """Raises ValueError listing missing, unexpected or mis-shaped leaves.

  Args:
    init: the model's {"params", "batch_stats"} (arrays or
      ShapeDtypeStructs).
    loaded: the same structure read from disk.
    allow_missing: regex; init leaves whose "/"-joined path matches may be
      absent from `loaded` (e.g. "classifier" for an ImageNet backbone).
    source: name for messages.

  Returns:
    the paths of init leaves that `loaded` does not provide.
  """
  want, have = _flat(init), _flat(loaded)
  pattern = re.compile(allow_missing) if allow_missing else None
  missing = [k for k in want if k not in have and
             not (pattern and pattern.search(k))]
  unexpected = [k for k in have if k not in want]
  misshaped = [f"{k}: {np.shape(have[k])} vs expected {want[k].shape}"
               for k in want if k in have and
               tuple(np.shape(have[k])) != tuple(want[k].shape)]
  problems = []
  for title, keys in (("missing", missing), ("unexpected", unexpected),
                      ("mis-shaped", misshaped)):
    if keys:
      problems.append(f"{len(keys)} {title}: " + ", ".join(keys[:20]) +
                      (" ..." if len(keys) > 20 else ""))
  if problems:
    raise ValueError(f"{source}: variables do not match the model:\n" +
                     "\n".join(problems))
  return [k for k in want if k not in have]


def merge_variables(init, loaded, allow_missing="", source="init_from"):
  """Copies `loaded` leaves into the `init` tree, strictly.

  Args:
    init: {"params", "batch_stats"} freshly initialised; ShapeDtypeStructs
      are accepted for leaves that `loaded` provides, leaves that keep their
      initial value must be concrete arrays.
    loaded, allow_missing, source: as in `check_variables`.

  Returns:
    a tree like `init` with NumPy leaves from `loaded` where present.
  """
  kept = check_variables(init, loaded, allow_missing, source)
  want, have = _flat(init), _flat(loaded)
  abstract = [k for k in kept if isinstance(want[k], jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"{source}: {len(abstract)} leaves would keep an "
                     f"abstract initial value ({abstract[0]} ...); pass "
                     "concrete initial variables")
  if kept:
    logging.info("%s: %d leaves keep their initial values (%s ...)", source,
                 len(kept), kept[0])

  def pick(path, leaf):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    if key in have:
      return np.asarray(have[key], dtype=leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(pick, init)


def load_variables(path, init, allow_missing=""):
  """Reads `path` (see module doc) and merges it into `init`."""
  return merge_variables(init, _read_variables(path), allow_missing,
                         f"init_from={path!r}")


INIT_FILE = "plca_jax_init.json"  # beside a converted checkpoint


def write_init_expectations(directory, record):
  """Records what converted weights expect (encoding, stride placement)."""
  (epath.Path(directory) / INIT_FILE).write_text(json.dumps(record, indent=1))


def read_init_expectations(path):
  """{"encoding", "stride_on", "source"} the weights at `path` expect.

  From `plca_jax_init.json` of a converted checkpoint, or from the
  `config.json` of a plca_jax workdir (workdirs from before
  `model.stride_on` existed used "1x1"); None when neither says.
  """
  root = epath.Path(path)
  if (root / INIT_FILE).exists():
    record = json.loads((root / INIT_FILE).read_text())
    return {"encoding": record["encoding"], "stride_on": record["stride_on"],
            "source": f"converted from {record.get('format', '?')} weights "
                      f"({record.get('converted_from', '?')})"}
  if (root / "config.json").exists():
    config = json.loads((root / "config.json").read_text())
    return {"encoding": config["data"]["encoding"],
            "stride_on": config["model"].get("stride_on", "1x1"),
            "source": "trained by plca_jax"}
  return None


def check_init_expectations(config):
  """Raises ValueError if `config.init_from`'s weights expect another
  input encoding or stride placement than the config sets."""
  expected = read_init_expectations(config.init_from)
  if expected is None:
    logging.warning("init_from=%s does not record the input encoding and "
                    "stride placement its weights expect; not checked",
                    config.init_from)
    return
  # ResNet-18/34 blocks stride their only first conv either way.
  checks = [("data.encoding", config.data.encoding, expected["encoding"])]
  if config.model.depth >= 50:
    checks.append(("model.stride_on", config.model.stride_on,
                   expected["stride_on"]))
  wrong = [(key, have, want) for key, have, want in checks if have != want]
  if wrong:
    fixes = " ".join(f"--config.{key}={want}" for key, _, want in wrong)
    raise ValueError(
        f"init_from={config.init_from!r} holds weights "
        f"{expected['source']} that expect " +
        ", ".join(f"{key}={want!r}" for key, _, want in wrong) +
        " but the config sets " +
        ", ".join(f"{key}={have!r}" for key, have, _ in wrong) +
        f". Set {fixes}, or for the paper's numbers convert the Caffe "
        "DeepLab ResNet-101 instead (docs/datasets.md, 'Weights').")
