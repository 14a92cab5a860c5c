"""Device memory of a compiled program against what a device has: the one place that reads
XLA's memory analysis, shared by the trainer's remat choice and the capacity planner."""

import dataclasses
import os
import re

from wan.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Need:
  """Per-device bytes of one compiled program; `refused` holds the compiler's out-of-memory
  message when it would not compile it (then `temporaries` is what the message names)."""
  arguments: int = 0
  temporaries: int = 0
  outputs: int = 0
  aliased: int = 0  # outputs that reuse an argument's buffer (the donated state)
  code: int = 0
  refused: str = ""

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased + self.code

  def fits(self, limit: float) -> bool:
    return not self.refused and self.total <= limit

  def describe(self) -> str:
    size = f"{self.total / GIB:.1f} GiB" if self.total >= GIB else f"{self.total / 2**20:.1f} MiB"
    return f"more than {size} (the compiler refused it)" if self.refused else size


class DoesNotFit(ConfigError):
  """No remat policy that remat_policy=AUTO tries fits; `needs` maps each policy to its Need."""

  def __init__(self, message: str, needs: dict):
    super().__init__(message)
    self.needs = needs


def of_compiled(compiled) -> Need:
  """The Need of a `jax.stages.Compiled`."""
  m = compiled.memory_analysis()
  return Need(arguments=m.argument_size_in_bytes, temporaries=m.temp_size_in_bytes,
              outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
              code=m.generated_code_size_in_bytes)


def of_refusal(error: Exception) -> Need | None:
  """The Need named by a compiler's out-of-memory error (None for any other error)."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  first = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0])
  return Need(temporaries=refused_temporaries(text), refused=first.strip()[:300])


def compile_need(lowered) -> tuple:
  """(the compiled program or None, its Need): compiles `lowered`, and a compiler's refusal
  for lack of memory is a Need, not an error."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises its own runtime error type
    need = of_refusal(e)
    if need is None:
      raise
    return None, need
  return compiled, of_compiled(compiled)


def refused_temporaries(message: str) -> int:
  """The temporaries (bytes) named by libtpu's out-of-memory message ("... the total memory
  required for HLO temporaries (247.73G) exceeds available HBM (95.74G)"); 0 if none."""
  size = re.search(r"temporaries \(([\d.]+)([TGMK])\)", message)
  units = {"T": 2**40, "G": GIB, "M": 2**20, "K": 2**10}
  return int(float(size.group(1)) * units[size.group(2)]) if size else 0


def device_limit(devices) -> int:
  """Bytes a program may use on each of `devices`: the accelerator allocator's limit, or on
  CPU the host's memory split over this process's devices (fake CPU devices share it)."""
  import jax
  local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
  stats = local[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(local)
