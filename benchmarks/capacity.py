"""Capacity planner: will this run fit on that TPU slice? Answered on any machine, no TPU needed.

  pip install "jax[tpu]==<the installed jax>"   # libtpu beside jax; not a project dependency
  python benchmarks/capacity.py --config=configs/wan21_t2v.py:14b --topology=v5p-8 \
      --config.height=720 --config.width=1280 --config.remat_policy=FULL

It AOT-compiles the run's real train step (`--job=generate`: one denoising step of sampling,
both guidance halves in one call) for the TPU topology with libtpu's compiler, the real Pallas
flash kernels and the topology's tuning-table entry included, and prints per device: the
arguments (the train state and the batch), the temporaries, the outputs, their total, the chip's
HBM, whether it fits, and the largest arrays. The last line is one JSON object (`topology`,
`devices`, `per_device_gib`, `hbm_gib`, `fits`, ...). A config that does not fit is reported as
such (`"fits": false`), also when the compiler itself refuses it for memory; any other config
error is one message, exit status 1.

Topologies: libtpu's names (v4:2x2x1, v5e:2x2, v5p:2x2x1 ... v5p:4x4x4, v6e:2x4, v6e:8x8,
tpu7x:2x2x1) or the Cloud TPU names v4-8, v5p-8 ... v5p-128, v5litepod-4 / v5e-4, v6e-8 ...
Data: the config's resolution and frames on synthetic batches (the planner reads no data).
"""

import dataclasses
import importlib.util
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from wan import memory  # noqa: E402  (no jax import: libtpu's settings come first)

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program: the module also imports)."""
  config_flags.DEFINE_config_file("config", None, "Run config file[:variant].")
  flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology (see the docstring).")
  flags.DEFINE_enum("job", "train", ["train", "generate"],
                    "train: the train step; generate: one sampling step.")
  flags.DEFINE_integer("top", 8, "How many of the largest arrays to list.")

GIB = memory.GIB

# HBM per chip (GiB) of each tuning-table generation; a device is a chip or, where libtpu shows
# each TensorCore as its own device (v4, 7x here), half of one.
HBM_PER_CHIP_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "7x": 192}

# Cloud TPU slice names: generation -> (libtpu name, TensorCores per chip in the count, chip
# grids by chip count). v4 and v5p names count TensorCores, v5e and v6e chips.
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
             256: "4x8x8", 512: "8x8x8"}
_GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
             256: "16x16"}
_ALIASES = {"v4": ("v4", 2, _GRIDS_3D), "v5p": ("v5p", 2, _GRIDS_3D),
            "v5litepod": ("v5e", 1, _GRIDS_2D), "v5e": ("v5e", 1, _GRIDS_2D),
            "v6e": ("v6e", 1, _GRIDS_2D)}


def topology_name(name: str) -> str:
  """libtpu's topology name for `name` ("v5p-8" -> "v5p:2x2x1"; libtpu names unchanged)."""
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
  if not m:
    return name
  gen, count = m.group(1), int(m.group(2))
  if gen not in _ALIASES:
    raise ValueError(f"unknown TPU slice {name!r}; Cloud names: "
                     f"{', '.join(g + '-N' for g in _ALIASES)}, or a libtpu name like v5p:2x2x1")
  lib, cores, grids = _ALIASES[gen]
  chips = count // cores
  if count % cores or chips not in grids:
    raise ValueError(f"{name}: no {gen} slice of {count}; choose from "
                     f"{', '.join(f'{gen}-{n * cores}' for n in grids)}")
  return f"{lib}:{grids[chips]}"


def topology_devices(name: str):
  """The devices of a TPU topology (needs libtpu; no TPU)."""
  # Compiling only: no claim on the machine's TPU (if any), so several planners run at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu", topology_name=topology_name(name)).devices


def hbm_gib(devices) -> float:
  """HBM per device of `devices` (GiB)."""
  import kernels
  key = kernels.device_key(devices[0])
  chips = len({tuple(d.coords) for d in devices})
  return HBM_PER_CHIP_GIB[key] * chips / len(devices)


@dataclasses.dataclass
class Report:
  """Per-device memory of one compiled program, and what it is made of."""
  topology: str
  devices: int
  device_kind: str
  mesh: dict
  need: memory.Need
  hbm: float  # bytes
  largest: list  # (bytes per device, what)
  program: str = ""  # what was compiled
  remat_policy: str = ""  # the train step's (AUTO resolved)
  remat_needs: dict = dataclasses.field(default_factory=dict)  # AUTO: each policy tried

  @property
  def fits(self) -> bool:
    return self.need.fits(self.hbm)

  def summary(self) -> dict:
    n = self.need
    extra = {"remat_policy": self.remat_policy} if self.remat_policy else {}
    if self.remat_needs:
      extra["remat_needs_gib"] = {p: round(m.total / GIB, 3) for p, m in self.remat_needs.items()}
    return {"topology": self.topology, "devices": self.devices, "device_kind": self.device_kind,
            "program": self.program, "mesh": self.mesh,
            "per_device_gib": round(n.total / GIB, 3),
            "arguments_gib": round(n.arguments / GIB, 3),
            "temporaries_gib": round(n.temporaries / GIB, 3),
            "outputs_gib": round(n.outputs / GIB, 3), "hbm_gib": round(self.hbm / GIB, 2),
            "fits": self.fits, **extra, **({"refused": n.refused} if n.refused else {})}


def _shard_bytes(x) -> int:
  """Bytes of one device's shard of a ShapeDtypeStruct with a sharding."""
  import numpy as np
  shape = x.sharding.shard_shape(x.shape)
  return int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize


def _largest_arguments(tree, top: int) -> list:
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  sized = [(_shard_bytes(x), "argument " + jax.tree_util.keystr(path, simple=True, separator="/"))
           for path, x in leaves]
  return sorted(sized, reverse=True)[:top]


_SHAPE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f8e4m3fn": 1, "f8e5m2": 1, "s64": 8, "f64": 8}


def _largest_values(hlo_text: str, top: int) -> list:
  """The largest arrays the compiled program computes (per device), with the op that makes
  them: where the temporaries go."""
  import math
  found = {}
  for line in hlo_text.splitlines():
    m = _SHAPE.match(line)
    if not m or m.group(2) not in _BYTES:
      continue
    dims = [int(d) for d in m.group(3).split(",") if d]
    nbytes = math.prod(dims) * _BYTES[m.group(2)]
    array = f"{m.group(2)}[{m.group(3)}]"
    op = re.search(r'op_name="([^"]+)"', line)
    if array not in found or (op and not found[array][1]):  # one line per array shape
      found[array] = (nbytes, op.group(1) if op else "")
  return sorted(((b, f"value {a} {op}".rstrip()) for a, (b, op) in found.items()),
                reverse=True)[:top]


@dataclasses.dataclass
class Program:
  """One program to compile for the topology, and what it is."""
  lowered: object  # jax.stages.Lowered (None when `compiled` is given)
  arguments: tuple  # its abstract arguments (with shardings)
  mesh: object
  what: str
  plan: object  # the train Plan (remat_policy=AUTO resolved) or the Generation
  compiled: object = None  # already compiled (remat_policy=AUTO compiled it while choosing)


def plan_config(c):
  """The config as the planner compiles it: TPU hardware, synthetic batches of its shape."""
  c = c.copy_and_resolve_references()
  c.hardware = "tpu"
  if c.job == "train":
    c.dataset_type = "synthetic"
  return c


def train_program(c, devices, memory_limit: float) -> Program:
  """The train step of config `c` on `devices`; remat_policy=AUTO picks its policy for
  `memory_limit` bytes per device."""
  from wan import plan as plan_lib, train
  from wan.data import batch as batch_lib
  plan = plan_lib.make(c, plan_lib.Devices.of(devices))
  run = train.setup(plan, devices, memory_limit)
  plan = run.plan
  arguments = (train.abstract_state(run), batch_lib.abstract(plan, run.mesh))
  # AUTO compiled the step while choosing: no second lowering of it
  lowered = None if run.compiled_step is not None else train.lower_step(run)
  return Program(lowered, arguments, run.mesh, _describe(plan), plan, run.compiled_step)


def _describe(plan) -> str:
  return (f"train step of {plan.family.name}" + (" (both experts)" if plan.expert == "both"
                                                 else "")
          + (f" LoRA rank {plan.lora.rank}" if plan.lora else "")
          + f", global batch {plan.global_batch}, {plan.seq_len} tokens/sample, remat "
          f"{plan.options.remat_policy}, {plan.options.weights_dtype} weights")


def measure(c, topology: str, job: str = "train", top: int = 8) -> Report:
  """Compiles config `c`'s `job` program for `topology` and returns its Report."""
  from wan import plan as plan_lib, sharding
  devices = topology_devices(topology)
  c = plan_config(c)
  hbm = hbm_gib(devices) * GIB
  head = dict(topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
              hbm=hbm)
  try:
    program = (train_program if job == "train" else sample_program)(c, devices, hbm)
  except memory.DoesNotFit as e:  # remat_policy=AUTO: no policy fits; each one's need
    plan = plan_lib.make(c, plan_lib.Devices.of(devices))
    mesh = sharding.make_mesh(plan.ici, plan.dcn, devices)
    last = list(e.needs)[-1]  # FULL: the least it can need
    return Report(**head, mesh=dict(mesh.shape), need=e.needs[last], largest=[],
                  program=_describe(plan), remat_policy="none fits", remat_needs=e.needs)
  if program.compiled is not None:
    compiled, need = program.compiled, memory.of_compiled(program.compiled)
  else:  # a refusal for memory is a Need too
    compiled, need = memory.compile_need(program.lowered)
  largest = [] if compiled is None else sorted(
      _largest_arguments(program.arguments, top) + _largest_values(compiled.as_text(), top),
      reverse=True)[:top]
  return Report(**head, mesh=dict(program.mesh.shape), need=need, largest=largest,
                program=program.what,
                remat_policy=program.plan.options.remat_policy if job == "train" else "")


def sample_program(c, devices, memory_limit=None) -> Program:
  """One denoising step of job=generate: the transformer's guided velocity (both guidance
  halves in one batch, as wan.pipeline runs it) for one video. `memory_limit` is unused:
  sampling has no remat."""
  del memory_limit
  import tempfile
  import jax
  import jax.numpy as jnp
  from wan import (conditioning, families, pipeline, plan as plan_lib, plan_sample, sharding,
                   transformer, vae)
  from wan.numerics import DTYPES
  c.job = "generate"
  if not (c.prompt or c.prompts_file):
    c.prompt = "capacity planning"  # the prompt's words do not change the program
  with tempfile.TemporaryDirectory() as tmp:
    family = families.FAMILIES[families.PRESET_FAMILIES[c.model_preset]]
    if plan_sample.needs_image(family, c.model_type) and not c.image:
      c.image = os.path.join(tmp, "image.png")  # only its shape matters; never read
      open(c.image, "wb").close()
    gen = plan_lib.generation(c, plan_lib.Devices.of(devices))
  mesh = sharding.make_mesh(gen.ici, gen.dcn, devices)
  s, model = gen.sampling, gen.model
  replicated = jax.NamedSharding(mesh, jax.P())
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        transformer.abstract(model, DTYPES[gen.options.weights_dtype]),
                        transformer.shardings(model, mesh))
  vae_cfg = vae.PRESETS[gen.family.vae]
  shape = (1, (s.num_frames - 1) // vae_cfg.scale_factor_temporal + 1,
           s.height // vae_cfg.scale_factor_spatial, s.width // vae_cfg.scale_factor_spatial,
           vae_cfg.z_dim)
  guided = s.guidance_scale > 1.0
  kind = gen.family.conditioning(c.model_type) if s.image or c.model_type == "I2V" else "none"
  cond = ({"cond": spec(shape), "cond_mask": spec(shape[:4] + (conditioning.MASK_CHANNELS,))}
          if kind == "concat" else
          {"first_frame": spec((1, 1) + shape[2:])} if kind == "first_frame" else {})
  image = spec((1, gen.family.image_tokens, model.image_dim)) if gen.family.image_tokens else None
  args = (params, spec(shape), spec(()), spec((2 if guided else 1, s.max_sequence_length,
                                               model.text_dim)), image, cond, spec(()))
  with jax.set_mesh(mesh):
    lowered = pipeline.velocity.lower(*args, model=model, options=gen.options, kind=kind,
                                      guided=guided)
  pt, ph, pw = model.patch_size
  tokens = (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw)
  what = (f"one sampling step of {gen.family.name} ({s.num_frames}x{s.height}x{s.width}, "
          f"{tokens} tokens, {'both guidance halves in one batch' if guided else 'no guidance'}"
          f"), {gen.options.weights_dtype} weights; the text encoder, VAE and CLIP the job "
          f"also holds are not counted")
  return Program(lowered, args, mesh, what, gen)


def print_report(r: Report):
  mib = lambda b: f"{b / GIB:8.2f} GiB"
  n = r.need
  print(f"program         {r.program}")
  print(f"topology        {r.topology}: {r.devices} x {r.device_kind}, mesh {r.mesh}")
  if r.remat_needs:
    print("remat_policy=AUTO: none fits: " + ", ".join(
        f"{p} {m.describe()}" for p, m in r.remat_needs.items()))
  if n.refused:
    print(f"refused by the compiler: {n.refused}")
  else:
    print(f"arguments       {mib(n.arguments)}   (parameter and optimizer shards, inputs)")
    print(f"temporaries     {mib(n.temporaries)}")
    print(f"outputs         {mib(n.outputs)}   ({mib(n.aliased).strip()} of it in donated "
          f"argument buffers)")
    print(f"total           {mib(n.total)}   per device")
  print(f"HBM             {mib(r.hbm)}   per device")
  print(f"fits            {'yes' if r.fits else 'NO'}")
  if r.largest:
    print("largest arrays (per device):")
    for nbytes, what in r.largest:
      print(f"  {mib(nbytes)}  {what}")
  print(json.dumps(r.summary()))


def require_libtpu(tool: str):
  """Exits with the install command when libtpu, whose TPU compiler `tool` runs, is missing."""
  if importlib.util.find_spec("libtpu") is None:
    import jax
    sys.exit(f"{tool} compiles with libtpu's TPU compiler, which is not installed: "
             f'pip install "jax[tpu]=={jax.__version__}" (no TPU is needed; keep it out of '
             "requirements.txt)")


def main(argv):
  del argv
  require_libtpu("the capacity planner")
  from wan.errors import ConfigError
  try:
    report = measure(FLAGS.config, FLAGS.topology, FLAGS.job, FLAGS.top)
  except (ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  print_report(report)


if __name__ == "__main__":
  define_flags()
  app.run(main)
