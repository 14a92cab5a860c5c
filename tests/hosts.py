"""Local processes as the hosts of one job (jax.distributed on CPU), for the multi-host tests."""

import os
import socket
import subprocess
import sys

from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(hosts: int, devices: int, *flags, config="configs/wan21_t2v.py:tiny") -> list:
  """`hosts` launch.py processes of `devices` CPU devices each, joined as one job by a free
  local coordinator port; their stdout and stderr together in .stdout."""
  port = _port()
  return [subprocess.Popen(
      [sys.executable, "launch.py", f"--config={config}",
       f"--config.coordinator_address=localhost:{port}", f"--config.num_processes={hosts}",
       f"--config.process_id={i}", *flags], cwd=ROOT, env=xla_env.env(devices, one_thread=True),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(hosts)]


def finish(procs, timeout: int) -> list[str]:
  """Each process's output, once all have exited 0 (else the failing one's output's end)."""
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs
