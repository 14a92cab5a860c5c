"""Rematerialisation (gradient checkpointing) policies, built in one place from the config name.

The transformer tags intermediates with `jax.ad_checkpoint.checkpoint_name`; CUSTOM saves or
offloads exactly the named ones and recomputes the rest.
"""

import jax

import kernels

POLICIES = ("NONE", "FULL", "MATMUL_WITHOUT_BATCH", "OFFLOAD_MATMUL_WITHOUT_BATCH", "CUSTOM",
            "AUTO")
# flash_residuals: the flash / ring kernels' output and log-sum-exp, all their backward needs
# from their forward (kernels.RESIDUALS).
NAMES = ("attn_output", "query_proj", "key_proj", "value_proj", "xq_out", "xk_out",
         "ffn_activation", kernels.RESIDUALS)


def auto_ladder(flash_kernels: bool) -> tuple:
  """What AUTO tries, least recomputation first, as (policy, names saved): train.setup keeps the
  first whose compiled step fits the devices' memory. flash_kernels: the attention runs the
  Pallas kernels (attention=flash or ring, and sequences of at least flash_min_seq_length).

  With the kernels the middle rung saves their residuals: one (S, D) activation per attention
  call spares the backward a second forward kernel, the step's largest recomputation at Wan's
  sequence lengths (4 S^2 D attention FLOPs against the projections' and FFN's 2 S D (4 D + 2 F)
  in each layer), and needs less memory than MATMUL_WITHOUT_BATCH, which saves every projection
  and FFN output but still runs the kernel again."""
  middle = (("CUSTOM", (kernels.RESIDUALS,)) if flash_kernels
            else ("MATMUL_WITHOUT_BATCH", ()))
  return (("NONE", ()), middle, ("FULL", ()))


def describe(policy: str, saved=()) -> str:
  return f"{policy} saving {', '.join(saved)}" if saved else policy


def check_names(names):
  unknown = sorted(set(names) - set(NAMES))
  if unknown:
    raise ValueError(f"unknown checkpoint names {unknown}; choose from {list(NAMES)}")


def policy(name: str, saved=(), offloaded=()):
  """The `jax.checkpoint` policy for a config name (None for NONE: no remat at all)."""
  cp = jax.checkpoint_policies
  if name == "NONE":
    return None
  if name == "FULL":
    return cp.nothing_saveable
  if name == "MATMUL_WITHOUT_BATCH":
    return cp.dots_with_no_batch_dims_saveable
  if name == "OFFLOAD_MATMUL_WITHOUT_BATCH":
    return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  if name == "CUSTOM":
    check_names(tuple(saved) + tuple(offloaded))
    both = sorted(set(saved) & set(offloaded))
    if both:
      raise ValueError(f"checkpoint names {both} are both saved and offloaded; pick one")
    return cp.save_and_offload_only_these_names(
        names_which_can_be_saved=list(saved), names_which_can_be_offloaded=list(offloaded),
        offload_src="device", offload_dst="pinned_host")
  if name == "AUTO":
    raise ValueError("remat_policy=AUTO names no policy of its own: train.setup replaces it "
                     "by the first of remat.auto_ladder whose step fits the devices")
  raise ValueError(f"remat_policy={name!r} is not one of {list(POLICIES)}")


def apply(fn, cfg):
  """`fn` wrapped in `jax.checkpoint` with the policy named by cfg.remat_policy."""
  if cfg.remat_policy == "NONE":
    return fn
  return jax.checkpoint(fn, policy=policy(cfg.remat_policy, cfg.names_which_can_be_saved,
                                          cfg.names_which_can_be_offloaded))
