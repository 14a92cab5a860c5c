"""Local processes as the hosts of one job (jax.distributed on CPU): two processes of 2 devices
train as one 4-device job (per-host weight loading and data, coordinated checkpoints, damage in
the part of a checkpoint that one host reads found by both, a resume read by one replica and
broadcast, a preemption notice to one host stopping both at one step;
two processes preparing one cache: tests/test_prepare.py)."""

import json
import os
import re
import signal

import jax
import numpy as np

from configs import wan21_t2v
from tests import damage, hosts
from wan import plan, train, transformer

SETTINGS = dict(max_train_steps=3, global_batch_size=4, checkpoint_every=12, precision="HIGHEST",
                warmup_steps_fraction=0.0)  # a constant rate: 3 steps are the first 3 of 4


def _flags(**settings) -> list[str]:
  return [f"--config.{k}={v}" for k, v in settings.items()]


def _losses(out):
  with open(os.path.join(out, "wan21_t2v_tiny", "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_hosts_match_one_find_damage_together_resume_on_one_replica_and_stop_together(
    tmp_path):
  """Both start from one saved checkpoint, which each process reads only its devices' parts of
  (transformer.load with a mesh), and take the losses of one 4-device process; the parameters
  split over the hosts (dcn_fsdp=2), so host 1 alone writes (ocdbt.process_1) the parts its
  devices hold. Those cut short in the newest checkpoint (step 3), orbax would fail on one
  host only, in the middle of its collectives: the file sizes listed when the save completed
  show the damage to both hosts before orbax reads, and both resume from step 2. That resume
  splits the batch over the hosts instead (dcn_data=-1, each host's devices one replica): with
  enable_single_replica_ckpt_restoring it reads on host 0, broadcasts to host 1 and continues
  as the uninterrupted run. Then SIGTERM to host 1 alone (as a TPU VM's maintenance event):
  jax's preemption sync point makes both hosts stop after one step, save it and exit 0."""
  weights = str(tmp_path / "weights")
  model = plan.make(wan21_t2v.get_config("tiny"), jax.devices()[:1]).model
  transformer.save(weights, model, transformer.init(model, jax.random.key(5)))
  settings = dict(SETTINGS, transformer_pretrained_model_name_or_path=weights)
  multi = str(tmp_path / "multi")
  procs = hosts.start(2, 2, f"--config.output_dir={multi}", *_flags(
      **dict(settings, checkpoint_every=4, dcn_data=1, dcn_fsdp=2)))
  # The same run in this process on 4 of its devices, one step longer, while the two work.
  c = wan21_t2v.get_config("tiny")
  c.update(dict(settings, max_train_steps=4, output_dir=str(tmp_path / "single")))
  want = train.train(plan.make(c, jax.devices()[:4]), jax.devices()[:4])
  hosts.finish(procs, 300)
  got = _losses(multi)
  assert len(got) == 3
  np.testing.assert_allclose(got, want[:3], rtol=1e-5)
  checkpoints = os.path.join(multi, "wan21_t2v_tiny", "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["1", "2", "3"]
  assert damage.truncate(os.path.join(checkpoints, "3", "state", "ocdbt.process_1"))
  procs = hosts.start(2, 2, f"--config.output_dir={multi}", *_flags(**dict(
      settings, max_train_steps=10_000, checkpoint_every=100_000,
      enable_single_replica_ckpt_restoring=True)))
  head = []
  for line in procs[0].stdout:  # host 0's progress lines, up to step 5 done
    head.append(line)
    if line.startswith("step 5/"):
      break
  procs[1].send_signal(signal.SIGTERM)
  outputs = hosts.finish(procs, 300)
  outputs[0] = "".join(head) + outputs[0]
  assert re.search(r"checkpoint at step 3 cannot be restored \(its file state/ocdbt.process_1/"
                   r"\S+ has \d+ bytes, \d+ when it was saved\); it was moved to \S+3.damaged "
                   r"and the run resumes from step 2", outputs[0]), outputs[0]
  assert "".join(outputs).count("resumed from step 2") == 1, outputs  # host 0 alone says so
  np.testing.assert_allclose(_losses(multi)[2:4], want[2:4], rtol=1e-5)
  found = re.search(r"^a preemption notice: stopped after step (\d+), saved", outputs[0], re.M)
  assert found, outputs
  assert 5 <= int(found[1]) < 10_000
  assert sorted(os.listdir(checkpoints)) == sorted(["1", "2", "3.damaged", found[1]])
