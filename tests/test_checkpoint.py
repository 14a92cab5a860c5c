"""Orbax checkpoints of train states: round trip with shardings, the last N kept, states without
the optimizer, and clear errors for a checkpoint that does not fit or is damaged (the file sizes
each completed save lists)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wan import checkpoint


def _state(mesh, scale=1.0, hidden=8):
  fsdp = jax.NamedSharding(mesh, jax.P("fsdp"))
  replicated = jax.NamedSharding(mesh, jax.P())
  put = jax.device_put
  return {"step": put(jnp.int32(3), replicated),
          "params": {"w": put(scale * jnp.arange(hidden * 2, dtype=jnp.float32).reshape(hidden, 2),
                              fsdp)},
          "opt_state": {"mu": put(scale * jnp.ones((hidden, 2)), fsdp)}}


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("fsdp",), devices=jax.devices())


def test_round_trip_keeps_values_shardings_and_data_position(tmp_path, mesh):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, save_optimizer=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(mesh, scale=step), {"next_sample": 4 * step})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]  # the last two kept
  state, data_state = ckpt.restore(3, _state(mesh, scale=0.0))
  ckpt.close()
  assert data_state == {"next_sample": 12}
  want = _state(mesh, scale=3)
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, ref)
    assert got.sharding == ref.sharding


def test_without_optimizer_state_keeps_the_given_one(tmp_path, mesh):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, save_optimizer=False)
  ckpt.save(5, _state(mesh, scale=2.0), {"next_sample": 0})
  ckpt.wait()
  fresh = _state(mesh, scale=0.0)
  state, _ = ckpt.restore(5, fresh)
  ckpt.close()
  np.testing.assert_array_equal(state["params"]["w"], _state(mesh, 2.0)["params"]["w"])
  assert state["opt_state"] is fresh["opt_state"]


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, mesh):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, save_optimizer=True)
  ckpt.save(1, _state(mesh, hidden=8), {"next_sample": 0})
  ckpt.wait()
  with pytest.raises(ValueError, match="does not fit this run.s model"):
    ckpt.restore(1, _state(mesh, hidden=16))
  ckpt.close()


def test_damaged_checkpoint_is_a_clear_error(tmp_path, mesh):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, save_optimizer=True)
  ckpt.save(1, _state(mesh), {"next_sample": 0})
  ckpt.close()
  for root, _, files in os.walk(tmp_path / "1" / "state"):
    for name in files:  # truncate every file of the array store
      open(os.path.join(root, name), "wb").close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, save_optimizer=True)
  with pytest.raises(ValueError, match="checkpoint at step 1 .* is damaged"):
    ckpt.restore(1, _state(mesh))
  ckpt.close()


def test_a_completed_save_lists_its_file_sizes_and_any_change_is_damage(tmp_path, mesh):
  """Each host compares the files with the sizes process 0 wrote when the save completed, before
  orbax reads anything: a file cut short, grown or missing, or an unreadable list, is damage;
  a checkpoint without the list is not checked."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, save_optimizer=True)
  ckpt.save(1, _state(mesh), {"next_sample": 0})
  ckpt.close()
  step_dir = str(tmp_path / "1")
  sizes = json.loads((tmp_path / "1" / checkpoint.SIZES).read_text())
  files = {os.path.relpath(os.path.join(root, n), step_dir)
           for root, _, names in os.walk(step_dir) for n in names}
  assert set(sizes) == files - {checkpoint.SIZES}
  assert all(sizes[name] == os.path.getsize(os.path.join(step_dir, name)) for name in sizes)
  assert checkpoint.damage(step_dir) is None
  data = sorted(n for n in sizes if "/d/" in n)[0]
  path = os.path.join(step_dir, data)
  content = open(path, "rb").read()
  with open(path, "ab") as f:
    f.write(b"x")
  assert checkpoint.damage(step_dir) == (
      f"its file {data} has {len(content) + 1} bytes, {len(content)} when it was saved")
  os.remove(path)
  assert checkpoint.damage(step_dir) == f"its file {data} is missing"
  (tmp_path / "1" / checkpoint.SIZES).write_text("{")
  assert "cannot be read" in checkpoint.damage(step_dir)
  os.remove(tmp_path / "1" / checkpoint.SIZES)
  assert checkpoint.damage(step_dir) is None


@pytest.mark.parametrize("saved_by,restored_by", [(False, True), (True, False)],
                         ids=["plain-then-single-replica", "single-replica-then-plain"])
def test_single_replica_restore_equals_every_replica_reading(tmp_path, saved_by, restored_by):
  """enable_single_replica_ckpt_restoring: replica 0 of the data axis reads, the other replica
  receives by broadcast; values and shardings as a plain restore, either writer's checkpoint."""
  replicas = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices())
  writer = checkpoint.Checkpointer(str(tmp_path), 1, True, single_replica=saved_by)
  writer.save(5, _state(replicas, scale=5.0), {"next_sample": 20})
  writer.close()
  reader = checkpoint.Checkpointer(str(tmp_path), 1, True, single_replica=restored_by)
  state, data_state = reader.restore(5, _state(replicas, scale=0.0))
  reader.close()
  assert data_state == {"next_sample": 20}
  for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(_state(replicas, scale=5.0))):
    assert got.sharding == ref.sharding
    for shard in got.addressable_shards:  # every device's copy, the broadcast ones included
      np.testing.assert_array_equal(shard.data, np.asarray(ref)[shard.index])
