"""Tests of plca_jax.console: the log file, its copy beside a remote
workdir, and stderr of C/C++ code sent to the log."""

import os
import subprocess
import sys
import textwrap
import time

from absl.testing import absltest

from plca_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConsoleTest(absltest.TestCase):

  def test_the_log_is_copied_beside_the_workdir_and_at_exit(self):
    root = self.create_tempdir().full_path
    local = os.path.join(root, "local.log")
    remote = os.path.join(root, "bucket", "run", "logs", "process_0.log")
    with open(local, "w") as f:
      f.write("first\n")
    stop = console.keep_beside(local, remote, every=0.05)
    deadline = time.time() + 10
    while not os.path.exists(remote):
      self.assertLess(time.time(), deadline)
      time.sleep(0.02)
    with open(local, "a") as f:
      f.write("second\n")
    deadline = time.time() + 10  # a loaded machine may delay the copies
    while True:
      with open(remote) as f:
        copied = f.read()
      if copied == "first\nsecond\n" or time.time() > deadline:
        break
      time.sleep(0.05)
    self.assertEqual(copied, "first\nsecond\n")
    with open(local, "a") as f:
      f.write("third\n")
    stop()  # a last copy
    with open(remote) as f:
      self.assertEqual(f.read(), "first\nsecond\nthird\n")

    # The last lines reach the copy at exit, between two periodic copies.
    script = textwrap.dedent(f"""
        from plca_jax import console
        console.keep_beside({local!r}, {remote!r}, every=3600)
        open({local!r}, "a").write("at exit\\n")
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": REPO})
    with open(remote) as f:
      self.assertTrue(f.read().endswith("at exit\n"))

  def test_c_level_stderr_goes_to_the_log(self):
    workdir = self.create_tempdir().full_path
    script = textwrap.dedent(f"""
        import os
        from plca_jax import console
        console.setup({workdir!r})
        with console.stderr_to_log():
          os.write(2, b"from C\\n")
        os.write(2, b"after\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    self.assertNotIn("from C", proc.stderr)
    self.assertIn("after", proc.stderr)
    with open(os.path.join(workdir, "logs", "process_0.log")) as f:
      self.assertIn("from C", f.read())

  def test_late_loop_callbacks_go_to_the_log_and_other_errors_do_not(self):
    workdir = self.create_tempdir().full_path
    # Exceptions raised in __del__ reach sys.unraisablehook, as those of
    # tensorstore's completion callbacks do.
    script = textwrap.dedent(f"""
        import asyncio
        from plca_jax import console
        console.setup({workdir!r})
        loop = asyncio.new_event_loop()
        loop.close()

        class Late:
          def __del__(self):
            loop.call_soon_threadsafe(print)

        class Other:
          def __del__(self):
            raise RuntimeError("another failure")

        Late()  # before: printed by Python's hook
        console.quiet_late_loop_callbacks()
        console.quiet_late_loop_callbacks()  # installed once
        Late()
        Other()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    self.assertEqual(
        proc.stderr.count("RuntimeError: Event loop is closed"), 1,
        proc.stderr)
    self.assertIn("another failure", proc.stderr)
    with open(os.path.join(workdir, "logs", "process_0.log")) as f:
      log = f.read()
    self.assertEqual(log.count("finished after its restore had stopped"), 1,
                     log)


if __name__ == "__main__":
  absltest.main()
