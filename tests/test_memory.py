"""Compiled memory against the devices' memory: remat_policy=AUTO keeps the least recomputing
policy whose compiled train step fits, refuses with each policy's need when none does, and
trains and resumes exactly as the policy it chose; the compiler's out-of-memory refusals read as
needs."""

import os

import jax
import pytest

from configs import wan21_t2v
from wan import memory, plan, remat, train
from wan.errors import ConfigError

GIB = memory.GIB


def _tiny(**overrides):
  c = wan21_t2v.get_config("tiny")
  c.update({"checkpoint_every": -1, "write_metrics": False, "global_batch_size": 2,
            "remat_policy": "AUTO", **overrides})
  return c


def _devices():
  return jax.devices()[:1]


# The tiny config's XLA attention: NONE, MATMUL_WITHOUT_BATCH, FULL.
LADDER = [remat.describe(*rung) for rung in remat.auto_ladder(flash_kernels=False)]


@pytest.fixture(scope="module")
def needs():
  """Each AUTO policy's compiled need for the tiny step on one device."""
  run = train.setup(plan.make(_tiny(remat_policy="NONE"), _devices()), _devices())
  return {remat.describe(*rung): train.compile_step(train.with_remat(run, *rung))[1]
          for rung in remat.auto_ladder(flash_kernels=False)}


def test_the_ladder_recomputes_more_to_need_less(needs):
  assert LADDER == ["NONE", "MATMUL_WITHOUT_BATCH", "FULL"]
  totals = [needs[p].total for p in LADDER]
  assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals), needs


@pytest.mark.parametrize("fits", LADDER)
def test_auto_keeps_the_first_policy_whose_step_fits(needs, fits, capsys):
  limit = needs[fits].total  # exactly what `fits` needs: every policy before it needs more
  run = train.setup(plan.make(_tiny(), _devices()), _devices(), memory_limit=limit)
  assert run.plan.options.remat_policy == fits
  assert run.compiled_step is not None
  log = capsys.readouterr().out
  assert f"remat_policy=AUTO: {fits}, the step needs" in log
  for earlier in LADDER[:LADDER.index(fits)]:
    assert f"{earlier} needs" in log


def test_auto_refuses_with_each_policys_need_when_none_fits(needs):
  limit = needs["FULL"].total - 1
  with pytest.raises(memory.DoesNotFit) as e:
    train.setup(plan.make(_tiny(), _devices()), _devices(), memory_limit=limit)
  assert isinstance(e.value, ConfigError)
  assert list(e.value.needs) == LADDER
  message = str(e.value)
  assert "no policy fits" in message and "per_device_batch_size" in message
  for p in LADDER:
    assert f"{p} needs {needs[p].describe()}" in message


def test_an_auto_run_trains_and_resumes_as_the_policy_it_chose(tmp_path):
  """The loop runs the step AUTO compiled, on a fresh and on a restored state."""
  def run(policy, steps, out):
    c = _tiny(remat_policy=policy, max_train_steps=steps, checkpoint_every=4,
              output_dir=str(tmp_path / out))
    return train.train(plan.make(c, _devices()), _devices())
  want = run("NONE", 4, "none")
  first = run("AUTO", 2, "auto")
  resumed = run("AUTO", 4, "auto")
  assert first + resumed == want  # AUTO chose NONE: the host's memory holds the tiny step


def test_auto_means_no_remat_where_nothing_is_differentiated():
  c = _tiny(job="generate", prompt="a cat")
  assert plan.generation(c, _devices()).options.remat_policy == "NONE"
  with pytest.raises(ValueError, match="AUTO names no policy"):
    remat.policy("AUTO")


def test_the_device_limit_on_cpu_is_the_hosts_memory_split_over_its_devices():
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert memory.device_limit(jax.devices()[:2]) == ram // 2


def test_a_compiler_refusal_for_memory_is_a_need():
  error = RuntimeError(  # as libtpu words it (benchmarks/results/capacity.jsonl)
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (247.73G) exceeds available HBM (95.74G).\n<program text>")
  need = memory.of_refusal(error)
  assert need.refused.startswith("RESOURCE_EXHAUSTED")
  assert need.temporaries == int(247.73 * GIB) and not need.fits(float("inf"))
  assert need.describe() == "more than 247.7 GiB (the compiler refused it)"
  assert memory.of_refusal(ValueError("shapes do not match")) is None
