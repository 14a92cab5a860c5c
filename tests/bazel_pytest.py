"""Runs one test file with pytest under Bazel, writing only below TEST_TMPDIR."""

import os
import sys

import pytest

if __name__ == "__main__":
  tmp = os.environ.get("TEST_TMPDIR", "/tmp")
  os.environ.setdefault("HOME", tmp)
  sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "--basetemp",
                        os.path.join(tmp, "pytest")]))
