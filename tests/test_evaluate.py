"""In-training evaluation on the tiny config: the timestep eval's pairs and means, and a run with
every evaluation on that writes its metrics, videos and TensorBoard images and resumes exactly."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from configs import wan21_t2v, wan22_t2v
from tests import clip_fixtures
from wan import evaluate, generate, metrics, plan, train
from wan.data import loader, prepare, video
from wan.errors import ConfigError

TIMESTEPS = (250, 750)


def _config(**fields):
  c = wan21_t2v.get_config("tiny")
  c.update(fields)
  return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A train cache and an eval cache ({cache}/eval) of the generated clips."""
  root = tmp_path_factory.mktemp("eval")
  train_clips = clip_fixtures.make_folder(root / "train", with_bad=False)
  eval_clips = clip_fixtures.make_folder(root / "eval", with_bad=False)
  out = str(root / "cache")
  prepare.run(plan.preparation(_config(job="prepare", train_data_dir=train_clips,
                                       eval_data_dir=eval_clips, tfrecords_dir=out)))
  return out


def _fields(cache, tmp_path, evaluation=True, **more):
  fields = dict(dataset_type="tfrecord", train_data_dir=cache, output_dir=str(tmp_path),
                write_metrics=True, precision="HIGHEST")
  if evaluation:
    fields.update(eval_data_dir=os.path.join(cache, "eval"), eval_every=2, timestep_eval=True,
                  timesteps_list=TIMESTEPS)
  return dict(fields, **more)


def test_pairs_follow_maxdiffusion_and_cover_small_sets():
  # Enough clips: one timestep each (clip i at i mod T), max_per_bucket per timestep.
  big = evaluate.pairs(420, range(7), 60, 420)
  assert big == [(i, i % 7) for i in range(420)]
  # Few clips: every clip at every timestep, round by round.
  small = evaluate.pairs(4, range(3), 60, 420)
  assert sorted(small) == [(i, k) for i in range(4) for k in range(3)]
  assert small[:4] == [(0, 0), (1, 1), (2, 2), (3, 0)]
  # Both caps hold.
  capped = evaluate.pairs(10, range(3), 2, 5)
  assert len(capped) == 5 and max(np.bincount([k for _, k in capped])) <= 2


def test_timestep_losses_are_the_means_of_each_clips_loss(cache, tmp_path):
  p = plan.make(_config(**_fields(cache, tmp_path)), jax.devices())
  run = train.setup(p)
  params = train.init_state(run)["params"]
  writer = metrics.Writer(str(tmp_path), p.num_steps, write_files=False)
  ev = evaluate.Evaluator(p, run.mesh, writer, train.sample_losses)
  got = ev.timestep_losses(params)
  clips = ev._clips  # pylint: disable=protected-access
  assert len(clips) >= 3
  want = {t: [] for t in TIMESTEPS}
  one = jax.jit(lambda batch, sigma, noise: train.sample_losses(params, batch, sigma, noise, p,
                                                                weighted=False))
  for i, k in evaluate.pairs(len(clips), TIMESTEPS, 60, 420):  # each pair alone
    batch = {k2: jax.numpy.asarray(v) for k2, v in loader.assemble([clips[i]], p).items()}
    noise = evaluate.clip_noise(p.seed, np.array([i]), clips[i]["latents"].shape)
    loss = one(batch, np.array([TIMESTEPS[k] / 1000], np.float32), noise)
    want[TIMESTEPS[k]].append(float(loss[0]))
  for t in TIMESTEPS:
    np.testing.assert_allclose(got[f"eval/loss_t{t}"], np.mean(want[t]), rtol=1e-5)
  np.testing.assert_allclose(got["eval/loss"], np.mean([np.mean(v) for v in want.values()]),
                             rtol=1e-5)
  assert ev.timestep_losses(params) == got  # fixed noise: the same numbers every time


def _rows(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return ([r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r])


def test_a_run_with_every_evaluation_writes_it_all_resumes_exactly_and_generates_alike(
    cache, tmp_path):
  """Two steps with every evaluation, resumed for two more: the training losses of a run without
  evaluation, an evaluation row, videos and TensorBoard images at steps 2 and 4; then the
  generate job on the run's checkpoint samples the video its evaluation did."""
  reference = train.train(plan.make(_config(**_fields(cache, tmp_path / "ref", evaluation=False,
                                                      max_train_steps=4)), jax.devices()))
  every = dict(enable_ssim=True, enable_generate_video_for_eval=True, prompt="a red ball",
               num_inference_steps=2, checkpoint_every=4)
  first = train.train(plan.make(_config(**_fields(cache, tmp_path, max_train_steps=2, **every)),
                                jax.devices()))
  second = train.train(plan.make(_config(**_fields(cache, tmp_path, max_train_steps=4, **every)),
                                 jax.devices()))
  np.testing.assert_allclose(first + second, reference, rtol=1e-6)

  run_dir = tmp_path / "wan21_t2v_tiny"
  steps, evals = _rows(run_dir)
  assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
  assert set(evals[0]) == {"step", "eval/loss", "eval/ssim"} | {
      f"eval/loss_t{t}" for t in TIMESTEPS}
  assert all(0 < r["eval/ssim"] < 1 for r in evals)
  assert evals[0]["eval/loss"] != evals[1]["eval/loss"]  # the weights moved
  for step in (2, 4):
    assert sorted(os.listdir(run_dir / "samples" / f"step_{step}")) == [
        "000_a_red_ball.mp4", "000_a_red_ball.png"]
  events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={
      event_accumulator.IMAGES: 0})
  events.Reload()
  assert [e.step for e in events.Images("eval/video_0")] == [2, 4]
  assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]

  # The generate job on the run's newest checkpoint (step 4): the same weights, prompt and seed.
  sheet = run_dir / "samples" / "step_4" / "000_a_red_ball.png"
  during = np.asarray(Image.open(sheet)).astype(int)  # lossless: the frames themselves
  os.remove(sheet)
  c = _config(job="generate", output_dir=str(tmp_path), prompt="a red ball",
              num_inference_steps=2)
  (path,) = generate.run(plan.generation(c, jax.devices()))
  assert path == str(run_dir / "samples" / "step_4" / "000_a_red_ball.mp4")
  assert np.abs(np.asarray(Image.open(sheet)).astype(int) - during).max() <= 1
  assert video.probe(path).num_frames == 5


@pytest.mark.parametrize("fields, message", [
    (dict(timestep_eval=True), "set eval_every >= 1"),
    (dict(eval_every=5, timestep_eval=True), "set eval_data_dir"),
    (dict(eval_every=5, enable_generate_video_for_eval=True), "set prompt"),
    (dict(eval_every=5, timestep_eval=True, eval_data_dir="/x", timesteps_list=(1200,)),
     "must be timesteps in"),
    (dict(eval_every=5), "eval_every=5 has no effect unless timestep_eval"),
])
def test_evaluation_settings_are_checked(fields, message):
  with pytest.raises(ConfigError, match=message):
    plan.make(_config(**fields), jax.devices())


def test_an_a14b_expert_is_evaluated_on_its_side_of_the_boundary():
  c = wan22_t2v.get_config("tiny")
  c.update(eval_every=5, timestep_eval=True, eval_data_dir="/x")
  with pytest.raises(ConfigError, match=r"timesteps_list has \[125, .*outside the 875..1000"):
    plan.make(c, jax.devices())


def test_both_experts_take_each_timestep_from_its_expert(cache, tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel
  c = wan22_t2v.get_config("tiny")
  c.update(_fields(cache, tmp_path, expert="both", timesteps_list=(250, 900)))
  p = plan.make(c, jax.devices())
  run = train.setup(p)
  both = train.model_params(run, train.init_state(run))
  writer = metrics.Writer(str(tmp_path), p.num_steps, write_files=False)
  got = evaluate.Evaluator(p, run.mesh, writer, train.sample_losses).timestep_losses(both)
  alone = {name: evaluate.Evaluator(dataclasses.replace(p, expert=name), run.mesh, writer,
                                    train.sample_losses).timestep_losses(both[name])
           for name in ("high_noise", "low_noise")}
  assert p.boundary == 0.875
  np.testing.assert_allclose(got["eval/loss_t900"], alone["high_noise"]["eval/loss_t900"],
                             rtol=1e-6)
  np.testing.assert_allclose(got["eval/loss_t250"], alone["low_noise"]["eval/loss_t250"],
                             rtol=1e-6)
  assert alone["high_noise"]["eval/loss_t250"] != alone["low_noise"]["eval/loss_t250"]
