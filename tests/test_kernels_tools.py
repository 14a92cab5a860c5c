"""`python -m kernels.bench` and `python -m kernels.sweep` run end to end (smoke shapes, CPU)."""

import json
import math
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

import kernels
from kernels import bench, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout + r.stderr


def test_attention_flops_by_hand():
  # B=2, H=3, Sq=5, Skv=7, D=11: QKᵀ and PV are 2·3·5·7·11 = 1155 multiply-adds per batch
  # element each, 2 FLOPs apiece: 2 matmuls · 2 batch · 1155 · 2 = 9240.
  assert bench.attention_flops(2, 3, 5, 7, 11) == 9240
  assert bench.attention_flops(2, 3, 5, 7, 11, backward=True) == 9240 + 2.5 * 9240
  # Wan 14B at 720p, 81 frames: one layer's self-attention forward is ~117 TFLOP.
  assert bench.attention_flops(1, 40, 75600, 75600, 128) == 4 * 40 * 75600**2 * 128


def test_block_size_flag_parsing():
  assert bench.parse_block_sizes(["block_q=256", "block_kv=128"]) == dict(block_q=256,
                                                                          block_kv=128)
  assert bench.parse_block_sizes([]) is None
  with pytest.raises(ValueError, match="unknown block size names"):
    bench.parse_block_sizes(["block_z=1"])
  with pytest.raises(ValueError, match="name=integer"):
    bench.parse_block_sizes(["block_q"])


def test_a_shape_that_cannot_run_gets_a_row_not_a_crash():
  too_big = bench.measure("xla", 1, 40, 75600, 128, jnp.bfloat16, None, reps=1)
  assert too_big["status"].startswith("skipped (memory") and "fwd_ms" not in too_big
  assert bench.measure("cudnn", 1, 2, 256, 64, jnp.float32, None, 1)["status"].startswith(
      "unavailable")
  failed = bench.measure("flash", 1, 1, 128, 300, jnp.float32, None, reps=1)  # D > 256
  assert failed["status"].startswith("failed: ValueError: head dim 300"), failed


def test_search_skips_candidates_that_fail():
  def time_of(sizes):
    if sizes.block_q == 256:
      raise RuntimeError("RESOURCE_EXHAUSTED: shared memory")
    return sizes.block_kv / 1000
  notes = []
  best, t = sweep.search(kernels.BlockSizes(), ("block_q", "block_kv"),
                         [(128, 256), (256, 64), (128, 128)], time_of, notes.append)
  assert (best.block_q, best.block_kv, t) == (128, 128, 0.128)
  assert any(n.startswith("  skip {'block_q': 256") for n in notes)
  assert sweep.search(kernels.BlockSizes(), ("block_q",), [(256,)], time_of, notes.append) == (
      None, math.inf)


def test_bench_smoke_prints_table_and_writes_json(tmp_path):
  out = _run("kernels.bench", "--smoke", f"--json={tmp_path / 'bench.json'}")
  assert "interpret mode" in out and "device: cpu" in out and "jax " in out and "float32" in out
  n = len(bench.SMOKE["seqs"]) * len(bench.IMPLS)  # progress while it runs, one line each
  assert re.search(rf"^\[1/{n}\] seq 256 heads 2 flash: fwd [\d.]+ ms, fwd\+bwd [\d.]+ ms",
                   out, re.M), out
  assert f"[{n}/{n}] seq 384 heads 2 cudnn: unavailable" in out
  assert re.search(r"^seq\s+heads\s+impl\s+fwd ms\s+fwd TF/s\s+f\+b ms\s+f\+b TF/s", out, re.M)
  for seq in bench.SMOKE["seqs"]:
    assert re.search(rf"^{seq}\s+2\s+flash\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(rf"^{seq}\s+2\s+cudnn\s.*unavailable", out, re.M), out
  result = json.load(open(tmp_path / "bench.json"))
  assert {"device", "jax", "dtype", "date"} <= set(result["header"])
  rows = {(r["impl"], r["seq"]): r for r in result["rows"]}
  assert set(rows) == {(i, s) for i in bench.IMPLS for s in bench.SMOKE["seqs"]}
  for (impl, seq), r in rows.items():
    if impl == "cudnn":
      assert r["status"].startswith("unavailable")
      continue
    assert r["status"] == "ok"
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops", "compile_fwd_s"):
      assert math.isfinite(r[key]) and r[key] > 0, (impl, seq, key)
    # TFLOP/s is the FLOP count over the measured time.
    flops = bench.attention_flops(1, r["heads"], seq, seq, r["head_dim"])
    assert math.isclose(r["fwd_tflops"], flops / (r["fwd_ms"] / 1e3) / 1e12, rel_tol=1e-9)
  assert math.isclose(rows["flash", 256]["fwd_vs_xla"],
                      rows["xla", 256]["fwd_ms"] / rows["flash", 256]["fwd_ms"])
  assert "fwd_vs_cudnn" not in rows["flash", 256]


def test_sweep_smoke_prints_a_pasteable_entry():
  out = _run("kernels.sweep", "--smoke")
  line = out.strip().splitlines()[-1]
  m = re.fullmatch(r'\s*"cpu": BlockSizes\((.*)\),', line)
  assert m, line
  chosen = eval(f"kernels.BlockSizes({m.group(1)})", {"kernels": kernels})  # it pastes
  grid = sweep.candidates("tpu", smoke=True)
  table = kernels.block_sizes_for("cpu")
  for names, values in grid.values():  # each kernel: a candidate, or the table's when faster
    got = tuple(getattr(chosen, n) for n in names)
    assert got in values or got == tuple(getattr(table, n) for n in names), (names, got)
  assert re.search(r"fwd: table entry [\d.]+ ms -> best [\d.]+ ms", out)
  err = float(re.search(r"max relative error ([\d.e+-]+)", out).group(1))
  assert err < 1e-4
