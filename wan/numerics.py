"""The dtype and matmul-precision names that configs may use, resolved in one place."""

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = {"DEFAULT": jax.lax.Precision.DEFAULT, "HIGH": jax.lax.Precision.HIGH,
              "HIGHEST": jax.lax.Precision.HIGHEST}


def compiler_options(platform: str) -> dict:
  """XLA options of the compiled train and evaluation steps on `platform` (jax.jit's
  compiler_options).

  CPU: XLA runs matmuls and some reductions through YNNPACK library fusions by default. Its
  reductions over a non-minor axis, the backward's sums over the tokens (every bias, norm scale
  and modulation gradient), took ~4 ms each for a (960, 512) input, 20x XLA's own loop; only the
  dots stay with YNNPACK (docs/performance.md has the measurement).
  """
  if platform == "cpu":
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  return {}
