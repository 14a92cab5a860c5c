#!/bin/sh
# The interpreter Bazel runs py_test targets with: the workspace's venv (README set-up command).
here=$(dirname "$(readlink -f "$0")")
exec "$here/../.venv/bin/python3" "$@"
