"""pytest set-up shared by all tests."""

import os
import tempfile

from absl import flags

# Before JAX initialises (test modules import it after this file): one
# persistent compilation cache for the whole session, shared with the
# subprocesses tests start (they inherit the environment), so each distinct
# program compiles once; and a cheaper XLA:CPU compilation, which does not
# matter for tiny test shapes. Compiling is most of a cold-cache run (these
# flags take about a third off the test config's PLCA update's compile and
# a fifth off LDR's):
# - no LLVM optimisation;
# - the legacy elemental emitters instead of the MLIR fusion emitters;
# - one LLVM module, not split for parallel compilation (two pytest
#   workers already use both cores).
_TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                   "--xla_cpu_use_fusion_emitters=false",
                   "--xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(),
                                   "plca_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), *_TEST_XLA_FLAGS]).strip()


# pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject.toml)
# hands whole modules to its two workers in collection order: one each,
# then one more each, then one whenever a worker is free. The longest
# modules (training runs, subprocesses) go first, the two longest to
# different workers, so that the short ones fill in around them. With
# xdist's own order (most tests first) methods_test and multiprocess_test
# landed on one worker, with 1.4x the other's test time.
_LONG_MODULES = ("methods_test.py", "train_test.py", "losses_test.py",
                 "aot_test.py", "multiprocess_test.py", "workdir_test.py",
                 "dacs_test.py", "multidevice_test.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
  del config
  # absltest helpers (create_tempdir) and grain worker processes read absl
  # flags, which `absltest.main()` would parse; under pytest, mark them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
