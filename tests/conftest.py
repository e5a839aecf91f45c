"""pytest set-up shared by all tests."""

import os
import tempfile

from absl import flags

# Before JAX initialises (test modules import it after this file): one
# persistent compilation cache for the whole session, shared with the
# subprocesses tests start (they inherit the environment), so each distinct
# program compiles once; and less XLA optimisation, which compiles faster
# and does not matter for tiny test shapes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(),
                                   "plca_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()


def pytest_configure(config):
  del config
  # absltest helpers (create_tempdir) and grain worker processes read absl
  # flags, which `absltest.main()` would parse; under pytest, mark them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
