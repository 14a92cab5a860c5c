"""HLO audit of a run's compiled train step for a TPU slice: the collectives of each scanned
layer against the FSDP minimum, and the copies and transposes that move data (needs libtpu;
no TPU).

  python benchmarks/hlo_audit.py --config=configs/wan21_t2v.py:14b --topology=v5p-8 \
      --config.height=720 --config.width=1280 --config.remat_policy=FULL \
      --config.global_batch_size=1

The step is compiled as benchmarks/capacity.py compiles it. The compiled program's instructions
are attributed to the forward layer scan, the backward layer scan or the rest of the step (by
the while loop each one runs in, through every fusion and call), and each collective is counted
with the bytes one device receives (all-gather: result x (n-1)/n; reduce-scatter: result x
(n-1); all-reduce: 2 x size x (n-1)/n; all-to-all: size x (n-1)/n; collective-permute: its
result; n the group size). TPU's reduce-scatter is an all-reduce-scatter fusion around an
all-reduce, counted as the reduce-scatter it is. XLA on TPU often splits a weight all-gather
into a ring of collective-permutes overlapped with the matmul that needs it (its collective
matmul), so the two are compared with the minimum together.

The FSDP minimum per layer: each layer's weights (this device's tensor-parallel part) gathered
once forward and once more for the backward's recomputation (FULL and the policies that do
not save them; NONE keeps them), and their gradient reduce-scattered once: per device
W x (n-1)/n received per gather and per reduce-scatter, n the fsdp x data size the weights are
split over. Where each sample's tokens are split over t devices (a batch smaller than data x
fsdp leaves fsdp to the tokens; context parallelism), self-attention's K/V add as many gathers
of 2 x S x D x (t-1)/t per sample and one reduce-scatter of their gradient (with ring
attention both travel as collective-permutes instead, which the table counts with the
gathers). `--json` writes the table.

It also counts the Pallas flash kernel calls per region: a `kernel flash_fwd` row in the
backward layer scan is the forward kernel run again for the recomputation (FULL,
MATMUL_WITHOUT_BATCH), which saving `flash_residuals` spares.

Then XLA's cost model: the TPU compiler writes each fusion's and op's `estimated_cycles` into
the compiled program; they are summed per region and run, by what the op does (matmul:
a fusion holding a convolution or dot; reduction; pad/slice; copy/transpose; dynamic slicing
of the scans' stacked arrays; elementwise and the rest), with the share of everything but the
matmuls. The Pallas kernels have no cycles there: XLA takes their work from the cost estimate
each pallas_call passes (kernels/flash_tpu.py), whose flops are printed beside.
"""

import collections
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import capacity  # noqa: E402
from wan import params as params_lib, train  # noqa: E402
from wan.numerics import DTYPES  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file[:variant].")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology (benchmarks/capacity.py).")
_JSON = flags.DEFINE_string("json", "", "Also write the table here.")
_HLO = flags.DEFINE_string("hlo", "", "Also write the compiled program's HLO text here.")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MOVES = ("copy", "transpose")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f8e4m3fn": 1, "f8e5m2": 1, "s64": 8, "f64": 8, "u64": 8, "s16": 2, "u16": 2}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
# A Pallas attention kernel call, by the name jax gives its pallas_call (kernels/flash.py).
_KERNEL = re.compile(r'op_name="[^"]*/(flash_(?:fwd|dkv|dq))\b')
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_KERNEL_FLOPS = re.compile(r'"cost_estimate":\{"flops":"?(\d+)')
# Cost-model categories, in the order printed; the first is the useful work.
COST_KINDS = ("matmul", "reduction", "pad/slice", "copy/transpose", "dynamic slicing",
              "elementwise and other")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _BYTES[t]
             for t, dims in _ARRAY.findall(shape) if t in _BYTES)


def _group_size(rest: str, devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]+)\}", rest)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if m:
    return int(m.group(2))
  return devices


def received(op: str, shape: str, rest: str, devices: int) -> float:
  """Bytes one device receives for one collective (see the module docstring)."""
  size = shape_bytes(shape)
  if op == "collective-permute":
    return size
  n = _group_size(rest, devices)
  return {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
          "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n}[op]


def parse(hlo: str):
  """(instructions by computation, parent of each called computation, while loops).

  instructions: {computation: [(name, shape, opcode, rest)]}; parents: {computation: the one
  that calls it}; whiles: {body computation: (op_name, trip count or None)}."""
  comps, parents, whiles, current = collections.defaultdict(list), {}, {}, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(1)
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    comps[current].append((name, shape, opcode, rest))
    called = _CALLED.findall(rest)
    for group in _BRANCHES.findall(rest):
      called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    for c in called:
      parents.setdefault(c, current)
    if opcode == "while":
      body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
      op_name = re.search(r'op_name="([^"]+)"', rest)
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
      whiles[body] = (op_name.group(1) if op_name else name, int(trips.group(1)) if trips
                      else None)
  return comps, parents, whiles


def _region(comp: str, parents: dict, whiles: dict) -> str | None:
  """The innermost while body that `comp` runs in (None: outside every loop)."""
  seen = set()
  while comp is not None and comp not in seen:
    if comp in whiles:
      return comp
    seen.add(comp)
    comp = parents.get(comp)
  return None


def _regions(comps, parents, whiles, layers: int):
  """({computation: the region its instructions run in}, {region: runs per step}): the layer
  scans run `layers` times where the compiled loop does not say."""
  where, trips = {}, {"rest of the step": 1}
  for comp in comps:
    body = _region(comp, parents, whiles)
    where[comp] = "rest of the step" if body is None else _label(whiles[body][0])
    if body is not None:
      trips[where[comp]] = whiles[body][1] or (layers if "layer scan" in where[comp] else None)
  return where, trips


def _label(op_name: str) -> str:
  if "transpose(jvp())" in op_name:
    return "backward layer scan"
  if "jvp()" in op_name:
    return "forward layer scan"
  return f"loop {op_name}"


def audit(hlo: str, devices: int, layers: int) -> dict:
  """{region: {kind: [count, bytes received per device (collectives) or moved (copies)]}} per
  run of the region, and each region's trip count (the layer scans': `layers` where the
  compiled loop does not say). Kinds: the collectives, copy/transpose, and the flash kernel
  calls ("kernel flash_fwd", "kernel flash_dkv", "kernel flash_dq"; count only)."""
  comps, parents, whiles = parse(hlo)
  table = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0.0]))
  where, trips = _regions(comps, parents, whiles, layers)
  for comp, instrs in comps.items():
    region = where[comp]
    fused = comp.startswith("fused") or ".fused" in comp or "fusion" in comp
    for name, shape, opcode, rest in instrs:
      base = opcode.removesuffix("-start").removesuffix("-done")
      if base == "all-reduce" and comp.startswith("all-reduce-scatter"):
        # TPU's reduce-scatter: an all-reduce-scatter fusion whose body holds an all-reduce
        # and the slice of it each device keeps; it moves what a reduce-scatter moves.
        n = _group_size(rest, devices)
        cell = table[region]["reduce-scatter"]
        cell[0] += 1
        cell[1] += shape_bytes(shape) * (n - 1) / n
      elif base in COLLECTIVES and not opcode.endswith("-start"):  # sync op or -done
        cell = table[region][base]
        cell[0] += 1
        cell[1] += received(base, shape, rest, devices)
      elif opcode == "custom-call" and (kernel := _KERNEL.search(rest)):
        table[region][f"kernel {kernel.group(1)}"][0] += 1  # a forward kernel in the
        # backward scan is a recomputation (saving flash_residuals spares it)
      elif not fused and (opcode in MOVES or (opcode == "fusion" and any(
          m in name for m in MOVES))):
        cell = table[region]["copy/transpose"]
        cell[0] += 1
        cell[1] += shape_bytes(shape)
  return {"regions": {r: dict(k) for r, k in table.items()}, "trips": trips}


def _cost_kind(opcode: str, inner: set) -> str:
  ops = inner | {opcode}
  if ops & {"convolution", "dot"}:
    return "matmul"
  if ops & {"reduce", "reduce-window"}:
    return "reduction"
  if opcode in ("pad", "slice") or (opcode == "fusion" and inner <= {"pad", "slice", "bitcast",
                                                                       "parameter"}):
    return "pad/slice"
  if opcode in MOVES or (opcode == "fusion" and inner <= {"copy", "transpose", "bitcast",
                                                          "parameter"}):
    return "copy/transpose"
  if ops & {"dynamic-slice", "dynamic-update-slice"}:
    return "dynamic slicing"
  return "elementwise and other"


def cost_model(hlo: str, layers: int) -> dict:
  """XLA's estimated cycles per region and run, by COST_KINDS, and the Pallas kernels' flops
  (their cost estimates): {"cycles": {region: {kind: cycles}}, "kernel_flops": {region:
  flops}, "trips": {region: runs}}."""
  comps, parents, whiles = parse(hlo)
  inner_ops = {}

  def inner(comp):
    if comp not in inner_ops:
      inner_ops[comp] = set()
      for _, _, opcode, rest in comps.get(comp, ()):
        inner_ops[comp] |= {opcode, *(o for c in _CALLED.findall(rest) for o in inner(c))}
    return inner_ops[comp]

  cycles = collections.defaultdict(lambda: collections.defaultdict(int))
  flops = collections.defaultdict(int)
  where, trips = _regions(comps, parents, whiles, layers)
  for comp, instrs in comps.items():
    region = where[comp]
    for _, _, opcode, rest in instrs:
      if opcode == "custom-call" and (kernel := _KERNEL_FLOPS.search(rest)):
        flops[region] += int(kernel.group(1))
      elif est := _CYCLES.search(rest):
        called = re.search(r"calls=%?([\w.\-]+)", rest) if opcode == "fusion" else None
        kind = _cost_kind(opcode, inner(called.group(1)) if called else set())
        cycles[region][kind] += int(est.group(1))
  return {"cycles": {r: dict(k) for r, k in cycles.items()}, "kernel_flops": dict(flops),
          "trips": trips}


def format_cost_model(costs: dict) -> str:
  lines = ["", "XLA's cost model (estimated cycles; Pallas kernels by their cost estimates' flops)",
           f"{'region':<22} {'trips':>5}  {'kind':<22} {'Mcycles/trip':>12} {'share':>6}"]
  for region, kinds in sorted(costs["cycles"].items()):
    trips, total = costs["trips"].get(region) or 1, sum(kinds.values())
    for kind in COST_KINDS:
      if kinds.get(kind):
        lines.append(f"{region:<22} {trips:>5}  {kind:<22} {kinds[kind] / 1e6:12.2f} "
                     f"{kinds[kind] / total:6.1%}")
    lines.append(f"{region:<22} {trips:>5}  {'not matmul':<22} "
                 f"{(total - kinds.get('matmul', 0)) / 1e6:12.2f} "
                 f"{1 - kinds.get('matmul', 0) / total:6.1%}")
    if costs["kernel_flops"].get(region):
      lines.append(f"{region:<22} {trips:>5}  {'flash kernels':<22} "
                   f"{costs['kernel_flops'][region] / 1e12:9.2f} TFLOP")
  return "\n".join(lines)


def fsdp_minimum(plan) -> dict:
  """Per layer and device: the bytes of one gather of the layer's weights and of one
  reduce-scatter of its gradient, and how many gathers the remat policy needs. With each
  sample's tokens split (a batch smaller than data x fsdp, or context parallelism), also the
  bytes of one gather of self-attention's K/V (the attention kernels gather them, once per
  forward like the weights) and of the reduce-scatter of their gradient."""
  decls = train.trained_declarations(plan)
  leaves = jax.tree.leaves(params_lib.abstract(decls, DTYPES[plan.options.weights_dtype]))
  layers = plan.model.num_layers
  per_layer = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves
                  if x.shape and x.shape[0] == layers) / layers
  mesh = plan.mesh_shape
  n = mesh["fsdp"] * mesh["data"]
  part = per_layer / mesh["tensor"]
  moved = part * (n - 1) / n
  gathers = 1 if plan.options.remat_policy == "NONE" else 2
  batch_axes, token_axes = plan.split_axes
  t = math.prod(mesh[a] for a in token_axes)
  local_batch = plan.global_batch // plan.accumulation // math.prod(mesh[a] for a in batch_axes)
  kv = (2 * local_batch * plan.seq_len * plan.model.dim // mesh["tensor"]
        * np.dtype(DTYPES[plan.options.activations_dtype]).itemsize * (t - 1) / t)
  return {"layer_weight_bytes": part, "gather": moved, "gathers": gathers,
          "reduce_scatter": moved, "fsdp_group": n, "token_split": t, "kv_gather": kv}


def format_table(result: dict, minimum: dict) -> str:
  mib = lambda b: f"{b / 2**20:10.1f}"
  lines = [f"per layer and device: weights {minimum['layer_weight_bytes'] / 2**20:.1f} MiB; "
           f"FSDP minimum received: {minimum['gathers']} gather(s) of "
           f"{minimum['gather'] / 2**20:.1f} MiB + one reduce-scatter of "
           f"{minimum['reduce_scatter'] / 2**20:.1f} MiB (group of {minimum['fsdp_group']})"
           + (f"; tokens split over {minimum['token_split']} devices: + self-attention K/V "
              f"gathered as often ({minimum['kv_gather'] / 2**20:.1f} MiB) and their gradient "
              f"reduce-scattered once" if minimum["kv_gather"] else ""),
           "", f"{'region':<22} {'trips':>5}  {'kind':<20} {'count':>6} {'MiB/trip':>10}"
           f" {'MiB total':>10}"]
  for region, kinds in sorted(result["regions"].items()):
    trips = result["trips"].get(region) or 1
    for kind, (count, nbytes) in sorted(kinds.items()):
      lines.append(f"{region:<22} {trips:>5}  {kind:<20} {count:>6} {mib(nbytes)} "
                   f"{mib(nbytes * trips)}")
  layer = lambda region, kinds: sum(result["regions"].get(region, {}).get(k, (0, 0))[1]
                                    for k in kinds)
  gathered = layer("forward layer scan", ("all-gather", "collective-permute")) + layer(
      "backward layer scan", ("all-gather", "collective-permute"))
  scattered = layer("backward layer scan", ("reduce-scatter",))
  want_g = (minimum["gather"] + minimum["kv_gather"]) * minimum["gathers"]
  want_s = minimum["reduce_scatter"] + minimum["kv_gather"]
  what = "weight and K/V" if minimum["kv_gather"] else "weight"
  lines += ["", f"{what} gathers per layer (all-gather + collective-permute, both scans): "
                f"{gathered / 2**20:.1f} MiB vs minimum {want_g / 2**20:.1f} MiB "
                f"({gathered / want_g:.2f}x)" if want_g else "",
            f"gradient reduce-scatter per layer: {scattered / 2**20:.1f} MiB vs minimum "
            f"{want_s / 2**20:.1f} MiB" + (f" ({scattered / want_s:.2f}x)" if want_s else "")]
  return "\n".join(lines)


def main(argv):
  del argv
  capacity.require_libtpu("the HLO audit")
  devices = capacity.topology_devices(_TOPOLOGY.value)
  program = capacity.train_program(capacity.plan_config(_CONFIG.value), devices,
                                   capacity.hbm_gib(devices) * capacity.GIB)
  what, plan = program.what, program.plan
  compiled = program.compiled if program.compiled is not None else program.lowered.compile()
  hlo = compiled.as_text()
  if _HLO.value:
    with open(_HLO.value, "w") as f:
      f.write(hlo)
  result = audit(hlo, len(devices), plan.model.num_layers)
  minimum = fsdp_minimum(plan)
  print(f"program   {what}\ntopology  {_TOPOLOGY.value}: {len(devices)} devices, mesh "
        f"{plan.mesh_shape}\n")
  print(format_table(result, minimum))
  costs = cost_model(hlo, plan.model.num_layers)
  print(format_cost_model(costs))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"program": what, "topology": _TOPOLOGY.value, "minimum": minimum, **result,
                 "cost_model": costs}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
