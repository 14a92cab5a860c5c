"""`python -m kernels.bench` and `python -m kernels.sweep` run end to end (smoke shapes, CPU)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

import kernels
from kernels import bench, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout


def test_attention_flops_by_hand():
  # B=2, H=3, Sq=5, Skv=7, D=11: QK^T and PV are 2 * 2*3*5*7*11 multiply-adds each.
  assert bench.attention_flops(2, 3, 5, 7, 11) == 2 * (2 * 2 * 3 * 5 * 7 * 11)
  assert bench.attention_flops(2, 3, 5, 7, 11, backward=True) == 3.5 * 9240


def test_block_size_flag_parsing():
  assert bench.parse_block_sizes(["block_q=256", "block_kv=128"]) == dict(block_q=256,
                                                                          block_kv=128)
  assert bench.parse_block_sizes([]) is None
  with pytest.raises(ValueError, match="unknown block size names"):
    bench.parse_block_sizes(["block_z=1"])
  with pytest.raises(ValueError, match="name=integer"):
    bench.parse_block_sizes(["block_q"])


def test_bench_smoke_prints_table_and_writes_json(tmp_path):
  out = _run("kernels.bench", "--smoke", f"--json={tmp_path / 'bench.json'}")
  assert "interpret mode" in out and "fwd TF/s" in out and "device: cpu" in out
  result = json.load(open(tmp_path / "bench.json"))
  assert {"device", "jax", "dtype", "date"} <= set(result["header"])
  rows = {(r["impl"], r["seq"]): r for r in result["rows"]}
  assert set(rows) == {(i, s) for i in bench.IMPLS for s in (256, 384)}
  for (impl, seq), r in rows.items():
    if impl == "cudnn":
      assert r["status"].startswith("unavailable")
      continue
    assert r["status"] == "ok"
    for key in ("fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops"):
      assert math.isfinite(r[key]) and r[key] > 0, (impl, seq, key)
    # TFLOP/s is the FLOP count over the measured time.
    flops = bench.attention_flops(1, r["heads"], seq, seq, r["head_dim"])
    assert math.isclose(r["fwd_tflops"], flops / (r["fwd_ms"] / 1e3) / 1e12, rel_tol=1e-9)
  assert math.isclose(rows["flash", 256]["fwd_vs_xla"],
                      rows["xla", 256]["fwd_ms"] / rows["flash", 256]["fwd_ms"])


def test_sweep_smoke_prints_a_pasteable_entry():
  out = _run("kernels.sweep", "--smoke")
  line = out.strip().splitlines()[-1]
  m = re.fullmatch(r'\s*"cpu": BlockSizes\((.*)\),', line)
  assert m, line
  chosen = dict(kv.split("=") for kv in m.group(1).split(", "))
  grid = sweep.candidates("tpu", smoke=True)
  table = kernels.block_sizes_for("cpu")
  for names, values in grid.values():  # each kernel: a candidate, or the table's when faster
    got = tuple(int(chosen[n]) for n in names)
    assert got in values or got == tuple(getattr(table, n) for n in names), (names, got)
  assert "table entry" in out and "->" in out
