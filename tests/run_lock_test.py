"""Tests of plca_jax.run_lock: one run per workdir."""

import json
import os
import subprocess
import sys
import time

from absl.testing import absltest

from plca_jax import run_lock


def _dead_process():
  """(pid, start time) of a process that has exited."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  started = run_lock._process_start(proc.pid)
  proc.wait()
  return proc.pid, started


class RunLockTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = self.create_tempdir().full_path
    self.path = os.path.join(self.workdir, run_lock.LOCK_FILE)

  def _lock(self, **kwargs):
    kwargs.setdefault("settle", 0.0)
    return run_lock.RunLock(self.workdir, command="test run", **kwargs)

  def _write_holder(self, **fields):
    record = {"host": "vm", "pid": 1, "processes": 1, "started": "earlier",
              "command": "other run", "heartbeat": time.time(),
              "token": "theirs", **fields}
    # Written aside and renamed, as a run that takes the lock over does: the
    # heartbeat thread never reads half a record.
    with open(self.path + ".new", "w") as f:
      json.dump(record, f)
    os.replace(self.path + ".new", self.path)

  def test_acquire_records_the_holder_and_release_removes_it(self):
    lock = self._lock().acquire()
    with open(self.path) as f:
      record = json.load(f)
    self.assertEqual(record["pid"], os.getpid())
    self.assertEqual(record["command"], "test run")
    self.assertEqual(record["pid_start"], run_lock._process_start(os.getpid()))
    self.assertIn("heartbeat", record)
    lock.release()
    self.assertFalse(os.path.exists(self.path))

  def test_a_live_holder_refuses_a_second_run(self):
    with self._lock():
      with self.assertRaisesRegex(run_lock.WorkdirLocked,
                                  f"in use by another run: host .* pid "
                                  f"{os.getpid()} .*--force"):
        self._lock().acquire()
      self.assertTrue(os.path.exists(self.path))  # still the first run's

  def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(self):
    pid, started = _dead_process()
    self._write_holder(host=run_lock.socket.gethostname(), pid=pid,
                       pid_start=started)
    with self.assertLogs(level="WARNING") as logs:
      lock = self._lock().acquire()
    self.assertIn(f"process {pid} no longer exists", logs.output[0])
    self.assertIn("other run", logs.output[0])
    lock.release()

  def test_a_reused_pid_is_not_the_holder(self):
    # This process's pid with another start time: the holder is gone.
    self._write_holder(host=run_lock.socket.gethostname(), pid=os.getpid(),
                       pid_start=-1)
    with self.assertLogs(level="WARNING"):
      self._lock().acquire().release()

  def test_another_hosts_lock_is_stale_only_without_heartbeats(self):
    self._write_holder(host="elsewhere", heartbeat=time.time() - 30)
    with self.assertRaisesRegex(run_lock.WorkdirLocked, "host elsewhere"):
      self._lock(stale_after=600).acquire()
    self._write_holder(host="elsewhere", heartbeat=time.time() - 700)
    with self.assertLogs(level="WARNING") as logs:
      self._lock(stale_after=600).acquire().release()
    self.assertIn("heartbeat stopped", logs.output[0])

  def test_force_takes_over_a_live_holder(self):
    self._write_holder(host="elsewhere")
    with self.assertLogs(level="WARNING") as logs:
      lock = self._lock().acquire(force=True)
    self.assertIn("--force", logs.output[0])
    with open(self.path) as f:
      self.assertEqual(json.load(f)["token"], lock.record["token"])
    lock.release()

  def test_the_heartbeat_thread_renews(self):
    lock = self._lock(heartbeat=0.05).acquire()
    self.addCleanup(lock.release)
    with open(self.path) as f:
      first = json.load(f)["heartbeat"]
    time.sleep(0.5)
    with open(self.path) as f:
      self.assertGreater(json.load(f)["heartbeat"], first)

  def test_a_lost_lock_is_reported_and_not_removed(self):
    lock = self._lock(heartbeat=3600).acquire()  # beats driven by hand
    self.addCleanup(lock.release)
    self.assertTrue(lock.renew())
    self._write_holder(host="elsewhere")  # taken over (e.g. --force)
    with self.assertLogs(level="ERROR") as logs:
      self.assertFalse(lock.renew())
    self.assertIn("taken over by host elsewhere", logs.output[0])
    lock.release()  # not ours any more: left in place
    with open(self.path) as f:
      self.assertEqual(json.load(f)["token"], "theirs")

  def test_a_half_written_record_is_left_alone(self):
    lock = self._lock(heartbeat=3600).acquire()
    self.addCleanup(lock.release)
    with open(self.path, "w") as f:
      f.write('{"host": "elsew')  # another run's write, midway
    self.assertTrue(lock.renew())
    with open(self.path) as f:
      self.assertEqual(f.read(), '{"host": "elsew')

  def test_a_removed_lock_is_written_again(self):
    lock = self._lock(heartbeat=3600).acquire()
    self.addCleanup(lock.release)
    os.remove(self.path)
    self.assertTrue(lock.renew())
    with open(self.path) as f:
      self.assertEqual(json.load(f)["token"], lock.record["token"])

  def test_a_racing_writer_wins_and_the_other_is_refused(self):
    lock = self._lock(settle=0.3)
    original = lock.read
    calls = []

    def read_after_race():
      calls.append(1)
      if len(calls) == 2:  # after our write, before the read-back
        self._write_holder(host="elsewhere", token="racer")
      return original()
    lock.read = read_after_race
    with self.assertRaisesRegex(run_lock.WorkdirLocked, "at the same time"):
      lock.acquire()


if __name__ == "__main__":
  absltest.main()
