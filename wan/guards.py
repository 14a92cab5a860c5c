"""What keeps a training run safe from outside: stop requests (SIGTERM, SIGINT, preemption
notices) honoured at a step boundary with a checkpoint, and one run per run directory."""

import os
import signal
import socket
import threading

import jax

from wan import fs
from wan.errors import ConfigError


class StopRequests:
  """SIGTERM or SIGINT (a one-process run), or a preemption notice reaching jax's sync point (a
  multi-host run), asks the loop to save a checkpoint at the next step boundary and stop. A
  second SIGINT stops at once."""

  def __init__(self):
    self.reason = None
    self._old = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.reason is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.reason = signal.Signals(signum).name

  def due(self, step: int) -> bool:
    if jax.process_count() > 1 and self.reason is None:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.reason = "a preemption notice"
      except RuntimeError:  # no preemption service (jax.distributed without it)
        pass
    return self.reason is not None


class RunLock:
  """{run_dir}/.lock while a run is active (process 0, local run directories): a second run on
  the same directory is refused; a lock left by a killed run on this host is taken over."""

  def __init__(self, run_dir: str):
    self._path = os.path.join(run_dir, ".lock")
    self._held = False

  def __enter__(self):
    if jax.process_index() != 0 or fs.is_remote(self._path):
      return self
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
      try:
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._check_stale()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
      self._held = True
      return self
    raise ConfigError(f"cannot take {self._path}")

  def _check_stale(self):
    try:
      with open(self._path) as f:
        host, pid = f.read().split()
    except (OSError, ValueError):
      host, pid = "", "0"
    if host == socket.gethostname() and not alive(int(pid)):
      os.remove(self._path)  # left by a run that was killed: take it over
      return
    raise ConfigError(
        f"another run ({'pid ' + pid + ' on ' + host if host else 'unknown'}) is using "
        f"{os.path.dirname(self._path)}: wait for it to finish, or set another run_name; if no "
        f"run is active there (one on another host was killed), delete {self._path}")

  def __exit__(self, *exc):
    if self._held:
      os.remove(self._path)


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return pid > 0
