"""Training checkpoints with orbax: asynchronous, atomic, the last N kept, exact resume.

A checkpoint holds the train state (step, params and, with save_optimizer, the optimizer state)
and the data iterator's position. Orbax writes each step into a temporary directory and renames
it when complete, so an interrupted save never replaces or damages an earlier checkpoint; a
restart finds the newest complete one. The RNG needs no saving: every step's key is derived from
(seed, step).

Once a save is complete, process 0 adds the size of each of its files (SIZES). Before restoring,
every host compares the files with it, so that all hosts find a damaged checkpoint damaged
together, also when the damage is in a part that only one host reads (orbax reports that on
that host alone, in the middle of its collectives).
"""

import contextlib
import errno
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

from wan import fs
from wan.errors import CheckpointError


# State entries never written: a LoRA run's frozen base, which a restart reads again.
UNSAVED = ("base",)

# In each step's directory: {file under it: size in bytes} when its save completed.
SIZES = "wan_sizes.json"


class Checkpointer:
  """Saves and restores `{"step", "params", "opt_state"}` states plus the data position.

  single_replica: restores read each array on one replica only (the devices at index 0 of the
  mesh's first axis, "data", over which every saved array is replicated) and broadcast it to
  the other replicas over the interconnect (orbax's single-replica handler), instead of every
  replica reading the whole checkpoint from storage. Saves are the same either way, and either
  reads the other's checkpoints.
  """

  def __init__(self, directory: str, keep: int, save_optimizer: bool,
               single_replica: bool = False):
    self._save_optimizer, self._single_replica = save_optimizer, single_replica
    self._directory, self._keep = directory, keep
    self._writing_step = None  # the step of the save in flight
    self._unlisted = None  # the step of a save whose sizes are not written yet
    if not fs.is_remote(directory):
      fs.makedirs(directory)
    self._manager = self._open()

  def _open(self):
    array_handler = (type_handlers.SingleReplicaArrayHandler(replica_axis_index=0)
                     if self._single_replica else type_handlers.ArrayHandler())
    registry = type_handlers.create_type_handler_registry((jax.Array, array_handler))
    return ocp.CheckpointManager(
        self._directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, enable_async_checkpointing=True, create=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict, data_state: dict):
    """Starts an asynchronous save of `state` at `step` (returns before the write finishes).
    A failed write (of this save or of the one before, which orbax reports here) raises one
    CheckpointError; the checkpoints completed before it stay intact."""
    saved = self._saved(state)
    self.wait()  # the save before (orbax would wait for it anyway)
    self._writing_step = step
    with self._writing():
      self._check_space(saved)
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(saved), data=ocp.args.JsonSave(data_state)))
    self._unlisted = step

  def poll(self):
    """Writes the sizes of a save that has completed since the last call (cheap: no waiting,
    no collective; process 0 writes them)."""
    if self._unlisted is not None and not self._manager.is_saving_in_progress():
      step, self._unlisted = self._unlisted, None
      if jax.process_index() == 0 and step in self._manager.all_steps():
        directory = fs.join(self._directory, str(step))
        sizes = fs.file_sizes(directory)
        path = fs.join(directory, SIZES)
        tmp = fs.sibling(path, "tmp")
        with fs.open_file(tmp, "w") as f:
          json.dump(sizes, f, indent=0, sort_keys=True)
        fs.replace(tmp, path)

  def _check_space(self, saved: dict):
    """Refuses a save that the local disk cannot hold, before writing any of it (a write that
    fails half-way leaves orbax's threads failing one by one)."""
    if fs.is_remote(self._directory):
      return
    need = sum(x.nbytes for x in jax.tree.leaves(saved))
    free = shutil.disk_usage(self._directory).free
    if free < need:
      raise _NoSpace(f"needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free")

  def restore(self, step: int, state_like: dict):
    """(state, data_state) at `step`, placed like `state_like` (arrays or ShapeDtypeStructs with
    shardings). What is not saved (the optimizer state without save_optimizer, a LoRA run's
    base) is kept as `state_like` gives it."""
    target = self._saved(state_like)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    args_type = (type_handlers.SingleReplicaArrayRestoreArgs if self._single_replica
                 else type_handlers.ArrayRestoreArgs)
    restore_args = jax.tree.map(lambda x: args_type(sharding=x.sharding, global_shape=x.shape,
                                                    dtype=x.dtype), target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions too)
      raise CheckpointError(
          f"checkpoint at step {step} in {self._manager.directory} cannot be restored: it is "
          f"damaged or does not fit this run's model and optimizer (written by a different "
          f"config, or with save_optimizer={not self._save_optimizer}?). Delete that step's "
          f"directory to resume from an earlier one, or set a new run_name. Cause: {e}") from e
    state = dict(restored["state"])
    for k in set(state_like) - set(target):
      state[k] = state_like[k]
    return state, dict(restored["data"])

  def restore_newest(self, state_like: dict, log=print):
    """(step, state, data_state) of the newest checkpoint that restores, or None when there is
    none. A newer one that cannot be restored (truncated, corrupted) is reported and moved
    aside to <step>.damaged (its files kept), so that the run goes on from the one before; when
    none restores, the newest one's error is raised and nothing is moved."""
    errors = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      # Before orbax: every host reaches the same answer before its collectives start.
      bad = damage(fs.join(self._directory, str(step)))
      if bad:
        errors.append((step, bad, CheckpointError(
            f"checkpoint at step {step} in {self._directory} cannot be restored: {bad}. "
            f"Delete that step's directory to resume from an earlier one, or set a new "
            f"run_name")))
        continue
      try:
        state, data_state = self.restore(step, state_like)
      except CheckpointError as e:
        errors.append((step, str(e.__cause__)[:300], e))
        continue
      if errors:
        self._set_aside([bad for bad, _, _ in errors])
        for bad, why, _ in errors:
          log(f"checkpoint at step {bad} cannot be restored ({why}); it was moved to "
              f"{fs.join(self._directory, f'{bad}.damaged')} and the run resumes from step "
              f"{step}")
      return step, state, data_state
    if errors:
      raise errors[0][2]
    return None

  def _set_aside(self, steps):
    self._manager.close()
    if jax.process_index() == 0:
      for step in steps:
        path = fs.join(self._directory, str(step))
        target = fs.join(self._directory, f"{step}.damaged")
        if fs.exists(target):
          target = fs.sibling(target, "damaged")
        fs.rename(path, target)
    self._manager = self._open()

  def _saved(self, state: dict) -> dict:
    return {k: v for k, v in state.items()
            if k not in UNSAVED and (self._save_optimizer or k != "opt_state")}

  def wait(self):
    with self._writing():
      self._manager.wait_until_finished()
    self.poll()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed checkpoint write into one CheckpointError saying what to do."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (orbax raises bare Exceptions too)
      step = self._writing_step
      done = [s for s in self._manager.all_steps() if s != step]
      kept = (f"the checkpoints before it are intact (newest: step {max(done)}), and a rerun "
              f"resumes from there" if done else "no earlier checkpoint exists")
      what = f"checkpoint at step {step}" if step is not None else "a checkpoint"
      if _no_space(e):
        self._remove_partial()
        raise CheckpointError(
            f"{what} could not be written: no space left on the disk of {self._directory}"
            + (f" ({e})" if isinstance(e, _NoSpace) else "") + f"; "
            f"{kept}. Free space there (or set checkpoint_dir to a disk with room, or lower "
            f"checkpoints_to_keep), then rerun the same command") from None
      raise CheckpointError(f"{what} could not be written to {self._directory}: "
                            f"{_first_line(e)}; {kept}") from e

  def _remove_partial(self):
    """Deletes orbax's unfinished temporary directories (they only hold the failed write)."""
    if jax.process_index() != 0 or fs.is_remote(self._directory):
      return
    for name in os.listdir(self._directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self._directory, name), ignore_errors=True)


class _NoSpace(OSError):
  def __init__(self, detail: str):
    super().__init__(errno.ENOSPC, detail)

  def __str__(self):
    return self.strerror


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _no_space(e: BaseException) -> bool:
  return any((isinstance(x, OSError) and x.errno == errno.ENOSPC)
             or "No space left on device" in str(x) for x in _chain(e))


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0][:300]


def damage(step_dir: str) -> str | None:
  """What is wrong with the files of the checkpoint in `step_dir` (a file missing, or of another
  size than when it was saved), or None. Every host sees the same files, so every host gives the
  same answer. A checkpoint without SIZES (written by a process stopped before it wrote them, or
  by an older version) is not checked."""
  path = fs.join(step_dir, SIZES)
  if not fs.exists(path):
    return None
  try:
    with fs.open_file(path) as f:
      want = json.load(f)
  except (OSError, ValueError) as e:
    return f"its list of file sizes {path} cannot be read ({e})"
  have = fs.file_sizes(step_dir)
  for name, size in sorted(want.items()):
    if name not in have:
      return f"its file {name} is missing"
    if have[name] != size:
      return f"its file {name} has {have[name]} bytes, {size} when it was saved"
  return None


def latest_params(directory: str, params_like):
  """(step, params) of the newest checkpoint in `directory`, placed like `params_like` (arrays
  or ShapeDtypeStructs with shardings); None when the directory holds none. Only the parameters
  are read (not the optimizer state), for sampling from a training run."""
  if not fs.exists(directory):
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    manager.close()
    return None
  bad = damage(fs.join(directory, str(step)))
  if bad:
    manager.close()
    raise CheckpointError(f"checkpoint at step {step} in {directory} cannot be read: {bad}")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params_like)
  target = {"params": abstract}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    raise CheckpointError(
        f"checkpoint at step {step} in {directory} cannot be read: it is damaged or was written "
        f"for another model (another config?). Cause: {e}") from e
  finally:
    manager.close()
  params = restored["state"]["params"]
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  # A partial restore leaves what the checkpoint does not hold as the placeholders given.
  missing = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  if missing or jax.tree.structure(params) != jax.tree.structure(abstract) or shapes(
      params) != shapes(abstract):
    raise CheckpointError(
        f"checkpoint at step {step} in {directory} does not hold these parameters: it was "
        "written by another model or kind of run (a LoRA run's checkpoint holds its adapters: "
        "read it with enable_lora=True and the rank and lora_targets it trained with; a full "
        "fine-tune's with enable_lora=False)")
  return step, params
