"""The XLA flags of every test process: the in-process tests (tests/conftest.py) and the
subprocesses that tests start (launch.py runs, several-process runs).

Tests compile far more than they compute (tiny models, a few steps each), so they compile with
LLVM's optimisation level 0: a tiny train step compiles in ~5 s instead of ~8 s, and the suite
runs in about two thirds of the time. The XLA program (fusions, layouts, sharding) is the one
users run; only the machine code of its loops is less optimised, which the tiny shapes do not
feel. Users' runs keep XLA's defaults.
"""

import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"

# One persistent compilation cache per test session, shared by the xdist workers and by every
# process they start (Bazel gives each target its own TEST_TMPDIR): the many tests that train
# or sample the tiny models, in process or through launch.py, compile the same programs once.
SESSION_CACHE = os.path.join(
    os.environ.get("TEST_TMPDIR") or tempfile.gettempdir(),
    f"wan-tests-jax-cache-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")


def flags(devices: int, one_thread: bool = False) -> str:
  """XLA_FLAGS of a test process with `devices` fake CPU devices (one_thread: its matmuls on
  one thread, for the several processes of a multi-host test sharing the 2 test cores)."""
  single = " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  return (f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
          + (single if one_thread else ""))


def env(devices: int, one_thread: bool = False, **extra) -> dict:
  """os.environ for a subprocess with `devices` fake CPU devices (`flags`) and the session's
  compilation cache (launch.py's jax_cache_dir="" leaves it on), plus `extra` variables."""
  return dict(os.environ, XLA_FLAGS=flags(devices, one_thread),
              JAX_COMPILATION_CACHE_DIR=SESSION_CACHE,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
