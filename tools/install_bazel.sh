#!/usr/bin/env bash
# One-time, offline-capable Bazel install from Debian's packages (docs/bazel.md).
set -euo pipefail
if ! command -v bazel >/dev/null || [ ! -d /usr/src/bazel-bootstrap/mock_repos/rules_cc ]; then
  apt-get update -qq
  apt-get install -y -qq bazel-bootstrap bazel-bootstrap-source bazel-rules-java bazel-platforms
fi
