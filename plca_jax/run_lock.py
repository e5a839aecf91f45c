"""One run per workdir: a lock file that names its holder.

A training run (plca_jax.main, plca_jax.recipes) writes WORKDIR/RUN_LOCK
before it touches anything else there, and removes it when it exits. The
file is JSON: host, process id (and the process's start time, so a reused
pid is not mistaken for the holder), JAX process count, start time,
command line, and a heartbeat time that a background thread renews every
`HEARTBEAT_SECONDS`. On several hosts, process 0 holds the lock for the
job.

A second run on a locked workdir stops with a message naming the holder,
unless the holder is gone:
- on the same host, when its process no longer exists (checked by pid and
  start time): the lock is taken over with a warning;
- from another host (or a gs:// workdir written from elsewhere), when its
  heartbeat is older than `stale_after` seconds (default 10 minutes, 20
  missed heartbeats): taken over with a warning;
- `--force` takes it over regardless, for a holder known to be gone (e.g.
  a VM deleted less than `stale_after` ago).

Taking the lock is atomic on local disks (exclusive create). Object stores
such as GCS have no exclusive create through epath, so there the run
writes its record, waits `settle` seconds and reads it back: of two runs
that start together, only the one whose record survives goes on.
"""

import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

LOCK_FILE = "RUN_LOCK"
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 600


class WorkdirLocked(RuntimeError):
  """The workdir belongs to another run."""


def _process_start(pid):
  """The start time of process `pid` in clock ticks since boot, or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # Field 22; the command name (field 2) may hold spaces: split after it.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _alive_here(record):
  """True if the holder's process exists on this host (same pid, same
  start time where /proc tells it)."""
  pid = record.get("pid")
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    pass
  except (TypeError, ValueError):
    return False
  started = _process_start(pid)
  return started is None or started == record.get("pid_start")


def _remote(path):
  return "://" in str(path)


def describe(record):
  """One line naming a lock's holder."""
  age = time.time() - float(record.get("heartbeat", 0))
  return (f"host {record.get('host')} pid {record.get('pid')} "
          f"({record.get('processes', 1)} process(es)), started "
          f"{record.get('started')}, last heartbeat {age:.0f} s ago, "
          f"command: {record.get('command')}")


class RunLock:
  """The lock of one workdir; `acquire` then `release` (or `with`)."""

  def __init__(self, workdir, *, command=None, processes=1,
               stale_after=STALE_AFTER_SECONDS, heartbeat=HEARTBEAT_SECONDS,
               settle=None):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.stale_after = stale_after
    self.heartbeat = heartbeat
    self.settle = (5.0 if _remote(self.path) else 0.2) if settle is None \
        else settle
    self.record = {
        "host": socket.gethostname(), "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()), "processes": processes,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": command if command is not None else " ".join(sys.argv),
        "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread = None

  def read(self):
    """The current holder's record, or None (no lock, or unreadable)."""
    try:
      return json.loads(self.path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  def _holder_gone(self, holder):
    """Why `holder` no longer holds the workdir, or None if it may."""
    if holder.get("host") == self.record["host"]:
      if not _alive_here(holder):
        return f"its process {holder.get('pid')} no longer exists"
      return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after:
      return (f"its heartbeat stopped {age:.0f} s ago (more than "
              f"{self.stale_after:.0f} s)")
    return None

  def _write(self, exclusive=False):
    self.record["heartbeat"] = time.time()
    data = json.dumps(self.record, indent=1)
    if _remote(self.path):
      self.path.write_text(data)
      return
    if exclusive:  # fails if another run created it first
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      with os.fdopen(fd, "w") as f:
        f.write(data)
      return
    temporary = self.path.parent / f"{LOCK_FILE}.{self.record['token']}"
    temporary.write_text(data)
    os.replace(temporary, self.path)

  def acquire(self, force=False):
    """Takes the lock or raises WorkdirLocked naming the holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    holder = self.read()
    if holder is not None:
      gone = self._holder_gone(holder)
      if gone is None and not force:
        raise WorkdirLocked(
            f"{self.path.parent} is in use by another run: "
            f"{describe(holder)}. Wait for it to end, or stop it, or train "
            "in another workdir. If that run is gone (its host deleted, "
            "say), rerun with --force to take the workdir over.")
      logging.warning("Taking over %s from %s: %s.", self.path,
                      describe(holder),
                      "--force" if gone is None else gone)
    try:
      self._write(exclusive=holder is None)
    except FileExistsError:
      raise WorkdirLocked(f"{self.path.parent}: another run took the lock "
                          f"at the same time: {describe(self.read() or {})}"
                          ) from None
    time.sleep(self.settle)
    now = self.read()
    if now is None or now.get("token") != self.record["token"]:
      raise WorkdirLocked(f"{self.path.parent}: another run took the lock "
                          f"at the same time: {describe(now or {})}")
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="plca_jax-run-lock")
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(self.heartbeat) and self.renew():
      pass

  def renew(self):
    """One heartbeat: rewrites the record if the lock is still this run's.

    Returns False once another run holds the lock (logged as an error).
    A run that takes the lock over reads its record back after `settle`
    seconds, so a renewal that races with its write makes it refuse
    rather than leave two holders.
    """
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:  # removed by hand: this run writes it again
      holder = None
    except json.JSONDecodeError:  # another writer is midway: next beat
      return True
    if holder is not None and holder.get("token") != self.record["token"]:
      logging.error("%s was taken over by %s; this run no longer holds "
                    "its workdir.", self.path, describe(holder))
      return False
    try:
      self._write()
    except OSError as error:  # a passing storage error: try next beat
      logging.warning("Could not renew %s: %s", self.path, error)
    return True

  def release(self):
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self.read()
    if holder is not None and holder.get("token") == self.record["token"]:
      self.path.unlink()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def lock_job(workdir, force=False):
  """Process 0 takes the workdir's lock for the job; every process learns
  whether it did (a refused lock stops them all).

  Returns:
    process 0's acquired RunLock (None on the other processes).

  Raises:
    WorkdirLocked on every process when the lock is refused.
  """
  lock, error = None, None
  if jax.process_index() == 0:
    lock = RunLock(workdir, processes=jax.process_count())
    try:
      lock.acquire(force=force)
    except WorkdirLocked as refused:
      lock, error = None, refused
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirLocked(f"process 0 could not lock {workdir} (its log "
                            "says why)")
  if error is not None:
    raise error
  return lock
