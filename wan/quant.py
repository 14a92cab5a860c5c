"""qwix quantization of the transformer's dense layers, as a transform of the parameter tree.

Our networks are functions, not Flax modules, so qwix's module interception does not apply:
the one dense call (`layers.dense`) calls qwix's quantized dot_general itself, for the layers a
regex over our parameter paths (`qwix_module_path`) selects. Two uses:
- quantization-aware full fine-tuning: `mark` tags the selected layers of the trained tree
  inside the step (an empty `"qt"` entry, no leaves), and their products run quantized (weights
  and activations; fp8_full also quantizes the gradients in the backward, as e5m2), with
  straight-through gradients to the float weights;
- a quantized frozen base under LoRA: `quantize` stores the selected kernels as qwix QArrays
  (int8 or float8_e4m3 values with per-output-channel scales, the memory win), their activations
  quantized alike; the adapters run beside them in full precision.

Modes (`quantization`): int8 (int8 weights and activations), fp8 (e4m3 weights and
activations), fp8_full (e4m3 forward, e5m2 gradients). Calibration methods are qwix's strings:
absmax[,factor], minmax[,factor] (int8 only: asymmetric), rms,factor, fixed,a or fixed,lo,hi.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp

from wan import params

MODES = ("int8", "fp8", "fp8_full")
_CALIBRATION = re.compile(r"(absmax|minmax)(,[0-9.]+)?|rms,[0-9.]+|fixed,-?[0-9.]+(,-?[0-9.]+)?")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the selected dense layers run quantized (hashable: part of transformer.Options)."""
  mode: str
  weight_calibration: str = "absmax"
  act_calibration: str = "absmax"
  bwd_calibration: str = "absmax"
  targets: tuple[str, ...] = ()  # our dense-layer paths ("blocks/self_attn/q", "head/proj")

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantization={self.mode!r} is not one of {list(MODES)}")
    for name, method in (("weight", self.weight_calibration), ("act", self.act_calibration),
                         ("bwd", self.bwd_calibration)):
      if not _CALIBRATION.fullmatch(method):
        raise ValueError(f"{name}_quantization_calibration_method={method!r} is not a qwix "
                         "calibration: absmax[,f], minmax[,f], rms,f, fixed,a or fixed,lo,hi")
      if method.startswith("minmax") and self.mode != "int8":
        raise ValueError(f"{name}_quantization_calibration_method=minmax is asymmetric, which "
                         "qwix does for integer types only; use absmax with "
                         f"quantization={self.mode}")

  @property
  def weight_qtype(self):
    return jnp.int8 if self.mode == "int8" else jnp.float8_e4m3fn

  def qt_config(self, weight_stored: bool):
    """qwix's DotGeneralQtConfig; weight_stored: the kernel is already quantized (a QArray,
    dequantized before the product), so only the activations are quantized here."""
    from qwix._src.core.dot_general_qt import DotGeneralQtConfig  # pylint: disable=import-outside-toplevel
    qtype = self.weight_qtype
    bwd = jnp.float8_e5m2 if self.mode == "fp8_full" else None
    return DotGeneralQtConfig(
        lhs_qtype=qtype, rhs_qtype=None if weight_stored else qtype,
        lhs_calibration_method=self.act_calibration,
        rhs_calibration_method=self.weight_calibration,
        dlhs_grad_qtype=bwd, drhs_grad_qtype=bwd,
        dlhs_grad_calibration_method=self.bwd_calibration,
        drhs_grad_calibration_method=self.bwd_calibration,
        use_original_residuals=bwd is None)  # forward-only: the backward in full precision


def candidates(decls) -> tuple[str, ...]:
  """The dense layers of a declaration tree: modules holding a (in, out) kernel, stacked or
  not (the patch embedding, a convolution kernel, is not one)."""
  out = []

  def walk(node, prefix):
    if not isinstance(node, dict):
      return
    kernel = node.get("kernel")
    if kernel is not None and not isinstance(kernel, dict):
      stacked = kernel.axes[0] == "layers"
      if len(kernel.shape) - stacked == 2:
        out.append(prefix)
      return
    for key, child in node.items():
      walk(child, f"{prefix}/{key}" if prefix else key)
  walk(decls, "")
  return tuple(out)


def targets(decls, pattern: str) -> tuple[str, ...]:
  """The dense layers whose path `pattern` (qwix_module_path, a regex) matches in full."""
  return params.matching(candidates(decls), pattern, "qwix_module_path", "the dense layers")


def _map_layers(tree, paths, fn):
  """`tree` with fn(dense dict) in place of each dense layer at `paths` (the rest shared)."""
  for path in paths:
    tree = params.with_at(tree, path, fn(params.at(tree, path)))
  return tree


def mark(params_, settings: Settings):
  """Quantization-aware training: the selected dense layers of `params_` run quantized (an
  empty "qt" entry tells `layers.dense`; no leaves are added)."""
  return _map_layers(params_, settings.targets, lambda d: dict(d, qt={}))


def _channelwise(kernel) -> tuple[int, ...]:
  # One scale per output channel (and per block of a stacked kernel); the input axis shares it.
  return (0, 2) if kernel.ndim == 3 else (1,)


def quantize(params_, settings: Settings):
  """The frozen base with the selected kernels stored as QArrays (int8 / e4m3 values, float32
  per-output-channel scales); jit it with `shardings` as its out_shardings."""
  import qwix  # pylint: disable=import-outside-toplevel

  def one(dense):
    k = dense["kernel"]
    return dict(dense, kernel=qwix.quantize(
        k, settings.weight_qtype, channelwise_axes=_channelwise(k),
        calibration_method=settings.weight_calibration, scale_dtype=jnp.float32))
  return _map_layers(params_, settings.targets, one)


def shardings(tree_shardings, quantized_abstract):
  """Shardings of a `quantize`d tree: each QArray's values as its kernel, its scales (and zero
  points) likewise except on the axis they have size 1 (the contracted input axis)."""
  from qwix import QArray  # pylint: disable=import-outside-toplevel

  def fix(sharding, leaf):
    if not isinstance(leaf, QArray):
      return sharding
    spec = tuple(sharding.spec) + (None,) * (leaf.qvalue.ndim - len(sharding.spec))
    return jax.tree.map(lambda a: jax.NamedSharding(sharding.mesh, jax.P(
        *(None if n == 1 else s for n, s in zip(a.shape, spec)))), leaf)
  return jax.tree.map(fix, tree_shardings, quantized_abstract)


def is_stored(kernel) -> bool:
  from qwix import QArray  # pylint: disable=import-outside-toplevel
  return isinstance(kernel, QArray)


def dot(x, kernel, dimension_numbers, settings: Settings, dtype):
  """The quantized product of `layers.dense`: x (activations) against kernel (a float kernel,
  quantized here, or a stored QArray, dequantized), in `dtype`."""
  from qwix._src.core.dot_general_qt import dot_general_qt  # pylint: disable=import-outside-toplevel
  import qwix  # pylint: disable=import-outside-toplevel
  stored = is_stored(kernel)
  if stored:  # frozen: its values, not a gradient, are what the product needs
    kernel = jax.lax.stop_gradient(qwix.dequantize(kernel))
  return dot_general_qt(x.astype(dtype), kernel.astype(dtype), dimension_numbers,
                        settings.qt_config(stored))
