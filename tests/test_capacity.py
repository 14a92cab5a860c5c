"""The capacity planner and the TPU compiler: every TPU entry of the kernels' tuning table
compiles for its chip, and a run's train step compiles for a TPU topology on this CPU.

Needs libtpu beside jax (pip install "jax[tpu]==<jax version>"); skipped without it. The
topology names, aliases and the HBM table are checked without it.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import capacity
import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='needs libtpu: pip install "jax[tpu]==<jax version>"')

# One small topology per TPU generation of the tuning table.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x4",
              "7x": "tpu7x:2x2x1"}


def test_cloud_slice_names_map_to_libtpu_topologies():
  assert capacity.topology_name("v5p-8") == "v5p:2x2x1"
  assert capacity.topology_name("v5p-128") == "v5p:4x4x4"
  assert capacity.topology_name("v6e-8") == "v6e:2x4"
  assert capacity.topology_name("v5litepod-4") == "v5e:2x2"
  assert capacity.topology_name("v4-8") == "v4:2x2x1"
  assert capacity.topology_name("v6e:2x4") == "v6e:2x4"
  with pytest.raises(ValueError, match="v5p-8, v5p-16"):
    capacity.topology_name("v5p-6")
  with pytest.raises(ValueError, match="unknown TPU slice"):
    capacity.topology_name("v9-8")


def test_every_tpu_generation_of_the_tuning_table_has_a_topology_and_hbm():
  tpu_keys = {k for k in kernels.TABLE if kernels.tuning.platform_of(k) == "tpu"} - {"tpu"}
  assert tpu_keys == set(TOPOLOGIES) == set(capacity.HBM_PER_CHIP_GIB)


@needs_libtpu
@pytest.mark.parametrize("key", sorted(TOPOLOGIES))
def test_the_flash_kernels_compile_for_each_tpu_generation_with_its_tuning(key):
  """Forward and backward at Wan's head dim 128 and a sequence longer than every block, compiled
  by libtpu's Mosaic compiler with the entry's block sizes and VMEM limit."""
  import jax
  import jax.numpy as jnp
  device = capacity.topology_devices(TOPOLOGIES[key])[0]
  assert kernels.device_key(device) == key
  on_device = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct((1, 6144, 2, 128), jnp.bfloat16, sharding=on_device)

  def loss(q, k, v):
    return kernels.flash_attention(q, k, v, target=key).astype(jnp.float32).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
  text = compiled.as_text()
  assert text.count("tpu_custom_call") >= 3  # forward, dK/dV and dQ kernels
  # Each kernel tells XLA's cost model its work: per score 2 flops a head-dim term for each of
  # its products (forward: QK^T, PV; dK/dV: those and dP, dK; dQ: QK^T, dP, dQ).
  flops = {m.group(1): int(m.group(2)) for m in re.finditer(
      r'(flash_(?:fwd|dkv|dq)).*?"cost_estimate":\{"flops":"?(\d+)', text)}
  terms = 1 * 2 * 6144 * 6144 * 128  # batch x heads x queries x keys x head dim
  assert flops == {"flash_fwd": 2 * 2 * terms, "flash_dkv": 4 * 2 * terms,
                   "flash_dq": 3 * 2 * terms}, flops


@needs_libtpu
def test_the_tpu_compiler_checks_the_vmem_limit():
  """What makes the test above mean something: the same kernels with the v5p blocks in a 1 MiB
  scoped-VMEM limit are refused by Mosaic."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  device = capacity.topology_devices(TOPOLOGIES["v5p"])[0]
  x = jax.ShapeDtypeStruct((1, 6144, 2, 128), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  small = dataclasses.replace(kernels.TABLE["v5p"], vmem_limit_bytes=1 << 20)
  fwd = jax.jit(lambda q, k, v: kernels.flash_attention(q, k, v, target="v5p",
                                                        block_sizes=small))
  with pytest.raises(Exception, match="vmem"):
    fwd.lower(x, x, x).compile()


def _planner(*args):
  return subprocess.run([sys.executable, "benchmarks/capacity.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_the_planner_compiles_a_train_step_for_a_tpu_slice_and_reports_its_memory():
  r = _planner("--config=configs/wan21_t2v.py:tiny", "--topology=v5p-8",
               "--config.attention=flash", "--config.flash_min_seq_length=0",
               "--config.weights_dtype=bfloat16", "--config.activations_dtype=bfloat16",
               "--config.global_batch_size=4", "--config.remat_policy=AUTO")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["topology"] == "v5p-8" and out["devices"] == 4 and out["hbm_gib"] == 95.0
  assert out["fits"] is True and 0 < out["per_device_gib"] < 1
  assert out["remat_policy"] == "NONE"  # AUTO: the tiny step fits without recomputation
  assert "remat_policy=AUTO: NONE, the step needs" in r.stdout
  assert out["mesh"]["fsdp"] == 4
  assert "largest arrays" in r.stdout


@needs_libtpu
def test_the_planner_reports_a_run_that_does_not_fit():
  r = _planner("--config=configs/wan21_t2v.py:tiny", "--topology=v5e:2x2",
               "--config.height=1024", "--config.width=1024", "--config.num_frames=81",
               "--config.global_batch_size=64", "--config.remat_policy=AUTO")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["fits"] is False and out["hbm_gib"] == 16.0
  assert "fits            NO" in r.stdout
  # AUTO found no policy that fits: each one's need, all over the 16 GiB
  assert out["remat_policy"] == "none fits"
  assert set(out["remat_needs_gib"]) == {"NONE", "MATMUL_WITHOUT_BATCH", "FULL"}
  assert min(out["remat_needs_gib"].values()) > 16


def test_the_planner_without_libtpu_says_how_to_install_it():
  if importlib.util.find_spec("libtpu") is not None:
    pytest.skip("libtpu is installed")
  r = _planner("--config=configs/wan21_t2v.py:tiny", "--topology=v5p-8")
  assert r.returncode == 1
  assert 'pip install "jax[tpu]==' in r.stderr


@needs_libtpu
def test_the_planner_compiles_a_sampling_step():
  r = _planner("--config=configs/wan21_i2v.py:tiny", "--topology=v6e-8", "--job=generate",
               "--config.attention=flash", "--config.flash_min_seq_length=0")
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["hbm_gib"] == 32.0 and out["fits"] is True
  assert out["program"].startswith("one sampling step of wan2.1-i2v")
  assert "both guidance halves in one batch" in out["program"]


@needs_libtpu
def test_saved_flash_residuals_leave_no_forward_kernel_in_the_tpu_backward():
  """The HLO audit of the TPU step: FULL runs each layer's two forward kernels (self- and
  cross-attention) again in the backward scan; saving flash_residuals runs none."""
  from benchmarks import hlo_audit
  from configs import wan21_t2v
  devices = capacity.topology_devices("v5p-8")

  def backward_kernels(**remat):
    c = wan21_t2v.get_config("tiny")
    c.update(attention="flash", flash_min_seq_length=0, global_batch_size=4, **remat)
    program = capacity.train_program(capacity.plan_config(c), devices, 95 * capacity.GIB)
    regions = hlo_audit.audit(program.lowered.compile().as_text(), 4, 2)["regions"]
    return {k: v[0] for k, v in regions["backward layer scan"].items() if k.startswith("kernel")}

  assert backward_kernels(remat_policy="FULL") == {
      "kernel flash_fwd": 2, "kernel flash_dkv": 2, "kernel flash_dq": 2}
  assert backward_kernels(remat_policy="CUSTOM", names_which_can_be_saved=("flash_residuals",)) \
      == {"kernel flash_dkv": 2, "kernel flash_dq": 2}


@needs_libtpu
def test_one_video_on_four_chips_splits_its_tokens_and_all_reduces_no_activation():
  """A batch of 1 on v5p-8 (fsdp 4): each sample's 128 tokens split over the four chips, which
  gather each layer's weights and self-attention's K/V. The forward layer scan all-reduces
  less than one activation (only text-sized partial sums): left whole, the tokens would make
  every matmul of every layer all-reduce a (1, 128, ...) output. (At this size XLA all-reduces
  dK/dV in the backward instead of reduce-scattering them; at the 14B's it reduce-scatters:
  docs/performance.md.)"""
  from benchmarks import hlo_audit
  from configs import wan21_t2v
  devices = capacity.topology_devices("v5p-8")
  c = wan21_t2v.get_config("tiny")
  c.update(attention="flash", flash_min_seq_length=0, global_batch_size=1, remat_policy="FULL",
           height=128, width=128)
  program = capacity.train_program(capacity.plan_config(c), devices, 95 * capacity.GIB)
  plan = program.plan
  assert plan.seq_len == 128 and plan.split_axes == ((), ("fsdp",))
  minimum = hlo_audit.fsdp_minimum(plan)
  assert minimum["token_split"] == 4 and minimum["kv_gather"] > 0
  hlo = program.lowered.compile().as_text()
  regions = hlo_audit.audit(hlo, 4, 2)["regions"]
  # XLA's cost model: each layer's matmuls and the rest in cycles, the kernels in flops.
  costs = hlo_audit.cost_model(hlo, 2)
  for scan in ("forward layer scan", "backward layer scan"):
    assert costs["cycles"][scan]["matmul"] > 0 and costs["kernel_flops"][scan] > 0, costs
    assert set(costs["cycles"][scan]) <= set(hlo_audit.COST_KINDS)
  activation = 2 * plan.seq_len * plan.model.dim * 4 * 3 / 4  # one (1, 128, dim) f32 all-reduced
  assert regions["forward layer scan"].get("all-reduce", (0, 0))[1] < activation, regions
  # The backward multiplies by the weights its recomputation gathered (transformer._gathered):
  # it gathers no more than the forward (left to XLA, it gathered the attention projections
  # a second time: 55.3 against 46.7 KB here).
  gathered = lambda r: regions[r]["all-gather"][1]
  assert gathered("backward layer scan") <= gathered("forward layer scan"), regions
