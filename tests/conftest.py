"""Test setup: eight fake CPU devices for every test (set before jax is imported; compiled for
speed of compilation, tests/xla_env.py), and one
persistent compilation cache for the whole test session, shared by the xdist workers and the
processes they start (tests/xla_env.py): the many tests that train the tiny models compile the
same programs, and compile them once."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import xla_env  # noqa: E402  (no jax import)

os.environ.setdefault("XLA_FLAGS", xla_env.flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")

SESSION_CACHE = xla_env.SESSION_CACHE  # subprocesses get it through xla_env.env


def pytest_configure(config):
  del config
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", SESSION_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
  # The controller (or the only process) removes the directory; workers leave it to it.
  if not hasattr(config, "workerinput"):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path, monkeypatch):
  """Each test runs in its own directory, so a config's relative output_dir ("out") never lands in
  the checkout or in another test's run directory (two xdist workers training the same tiny config
  at once would otherwise share out/<run_name> and its run lock). Code under test reaches the repo
  by absolute paths; subprocess tests pass cwd=ROOT."""
  monkeypatch.chdir(tmp_path)
