"""The dtype and matmul-precision names that configs may use, resolved in one place."""

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PRECISIONS = {"DEFAULT": jax.lax.Precision.DEFAULT, "HIGH": jax.lax.Precision.HIGH,
              "HIGHEST": jax.lax.Precision.HIGHEST}
