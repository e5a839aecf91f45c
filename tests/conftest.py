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


# pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject.toml)
# hands whole modules to its two workers in collection order: one each,
# then one more each, then one whenever a worker is free. The longest
# modules (training runs, subprocesses) go first, the two longest to
# different workers, so that the short ones fill in around them. With
# xdist's own order (most tests first) methods_test and multiprocess_test
# landed on one worker: 586 s of tests against 411 s on the other.
_LONG_MODULES = ("methods_test.py", "train_test.py", "losses_test.py",
                 "multiprocess_test.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
  del config
  # absltest helpers (create_tempdir) and grain worker processes read absl
  # flags, which `absltest.main()` would parse; under pytest, mark them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
