"""Tests of plca_jax.xla's host-allocator and CPU-device settings."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest
import jax

from plca_jax import xla

# mallocs, writes and frees 256 MB twice (as XLA:CPU does with an update's
# temporary buffer); prints the minor page faults of the second round.
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from plca_jax import xla
    if sys.argv[1] == "keep":
      assert xla.keep_freed_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 * 2**20
    def round_trip():
      ptr = libc.malloc(size)
      ctypes.memset(ptr, 1, size)
      libc.free(ptr)
    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    round_trip()
    before = faults()
    round_trip()
    print(faults() - before)
""")


# Runs a computation with a 128 MB temporary four times; prints the minor
# page faults of the last three. "glibc_only": keep_freed_host_memory's
# mallopt settings without its synchronous CPU dispatch.
_EXECUTION_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from plca_jax import xla
    if sys.argv[1] == "keep":
      assert xla.keep_freed_host_memory()
    else:
      libc = ctypes.CDLL("libc.so.6")
      assert libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, -1) == 1
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) @ b.T))
    a, b = jnp.ones((8192, 64)), jnp.ones((64, 4096)) / 64
    def faults():
      return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    before = faults()
    for _ in range(3):
      f(a, b).block_until_ready()
    print(faults() - before)
""")


# mallocs from two live threads, then counts glibc's arenas (malloc_info's heaps).
_ARENAS_PROBE = textwrap.dedent("""
    import ctypes, os, sys, tempfile, threading
    from plca_jax import xla
    assert xla.keep_freed_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
    libc.fclose.argtypes = (ctypes.c_void_p,)
    blocks, both_alive = [], threading.Barrier(2)
    def allocate():
      blocks.append(libc.malloc(2**20))
      both_alive.wait()  # an exiting thread's arena goes to the next one
    threads = [threading.Thread(target=allocate) for _ in range(2)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    path = os.path.join(tempfile.mkdtemp(), "malloc_info.xml")
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(path).read().count("<heap nr="))
""")


def _second_allocation_faults(mode):
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True,
                       capture_output=True, text=True)
  return int(out.stdout.strip().splitlines()[-1])


class HostMemoryTest(absltest.TestCase):

  @absltest.skipUnless(sys.platform.startswith("linux"), "glibc only")
  def test_freed_memory_is_reused_without_page_faults(self):
    # 256 MB is 65536 pages: glibc's default maps it afresh each time.
    self.assertGreater(_second_allocation_faults("default"), 30000)
    self.assertLess(_second_allocation_faults("keep"), 1000)

  @absltest.skipUnless(sys.platform.startswith("linux"), "glibc only")
  def test_an_executions_temporaries_are_reused(self):
    # Dispatched asynchronously, the 128 MB temporary is malloced on an XLA
    # worker thread, whose arena maps blocks over 64 MB afresh (32k pages a
    # run); run in the calling thread, it comes from the main arena.
    def faults(mode):
      out = subprocess.run([sys.executable, "-c", _EXECUTION_PROBE, mode],
                           check=True, capture_output=True, text=True)
      return int(out.stdout.strip().splitlines()[-1])
    self.assertGreater(faults("glibc_only"), 60000)
    self.assertLess(faults("keep"), 3000)

  @absltest.skipUnless(sys.platform.startswith("linux"), "glibc only")
  def test_threads_keep_their_own_arenas(self):
    # One arena for all threads made the convolutions' packing-buffer
    # mallocs contend (the R101 update at 321x321 took 1.27x as long).
    out = subprocess.run([sys.executable, "-c", _ARENAS_PROBE], check=True,
                         capture_output=True, text=True)
    self.assertGreaterEqual(int(out.stdout.strip().splitlines()[-1]), 3)


class CpuDevicesTest(absltest.TestCase):

  def test_count_must_divide_over_the_processes(self):
    for total, processes in ((3, 2), (-2, 1)):
      with self.assertRaisesRegex(ValueError,
                                  rf"cpu_devices={total} .*\({processes}\)"):
        xla.set_cpu_devices(total, processes)
    xla.set_cpu_devices(0, 2)  # XLA's default: nothing to set

  def test_a_run_without_the_configured_count_fails_by_name(self):
    # This test process has one CPU device (JAX has started).
    n = jax.device_count()
    xla.check_cpu_devices(0)
    xla.check_cpu_devices(n)
    with self.assertRaisesRegex(
        ValueError, rf"cpu_devices={n + 1}, but this run has {n} CPU "
        r"device.*set_cpu_devices"):
      xla.check_cpu_devices(n + 1)

  def test_each_process_gets_its_share(self):
    # A fresh interpreter (the count is fixed when JAX starts): 4 devices
    # over 2 processes gives this process 2.
    out = subprocess.run(
        [sys.executable, "-c", "import jax; from plca_jax import xla; "
         "xla.set_cpu_devices(4, 2); print(jax.local_device_count())"],
        check=True, capture_output=True, text=True)
    self.assertEqual(out.stdout.strip().splitlines()[-1], "2")


class PlannedPlatformTest(absltest.TestCase):

  def _planned(self, env, blocked=(), devices=()):
    # A fresh process: the platform is read from its environment, its
    # installed plugins and its device files, before JAX starts a backend.
    # `blocked`: modules made to look installed; `devices`: device-file
    # patterns made to match. Prints the platform and jax_platforms after.
    code = textwrap.dedent(f"""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: (
            object() if name in {list(blocked)!r} else real(name, *a))
        from plca_jax import xla
        if {list(devices)!r}:
          real_glob = xla.glob.glob
          xla.glob.glob = lambda p: (
              [p] if p in {list(devices)!r} else real_glob(p))
        print(xla.select_platform(), xla.jax.config.jax_platforms)
        import jax
        assert not jax._src.xla_bridge._backends, "a backend started"
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env,
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip().splitlines()[-1]

  def test_an_accelerator_is_planned_where_its_plugin_and_devices_are(self):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    self.assertEqual(self._planned({**env, "JAX_PLATFORMS": "cpu"},
                                   blocked=("libtpu",)), "cpu cpu")
    self.assertEqual(self._planned({**env, "JAX_PLATFORMS": "cuda,cpu"}),
                     "cuda cuda,cpu")
    self.assertEqual(self._planned(env, blocked=("libtpu",),
                                   devices=("/dev/accel*",)), "tpu None")
    self.assertEqual(self._planned(env, blocked=("jax_cuda12_plugin",),
                                   devices=("/dev/nvidia[0-9]*",)),
                     "cuda None")

  def test_a_plugin_without_its_devices_leaves_the_run_on_cpu(self):
    # libtpu installed on a CPU host: the run is made a CPU one before JAX
    # would start libtpu (and print its warnings).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    self.assertEqual(self._planned(env, blocked=("libtpu",)), "cpu cpu")
    self.assertEqual(self._planned(env), "cpu cpu")


class CompilationCacheTest(absltest.TestCase):

  def test_workdir_cache_unless_one_is_set(self):
    code = textwrap.dedent("""
        import jax
        from plca_jax import xla
        print(xla.use_compilation_cache("", "/w"),
              jax.config.jax_compilation_cache_dir)
        print(xla.use_compilation_cache("workdir", "/w"),
              jax.config.jax_compilation_cache_dir)
        print(xla.use_compilation_cache("/other", "/w"))
    """)
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    self.assertEqual(out.stdout.split("\n")[:3],
                     [" None", "/w/compilation_cache /w/compilation_cache",
                      "/w/compilation_cache"])
    env["JAX_COMPILATION_CACHE_DIR"] = "/set"
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    self.assertEqual(out.stdout.split("\n")[:3],
                     ["/set /set", "/set /set", "/set"])


if __name__ == "__main__":
  absltest.main()
