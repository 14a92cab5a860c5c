"""job=generate end to end on the tiny configs: the command line on two hosts, mp4s decoded
back, prompts files, image-to-video, and the refusals (sampling from a training run's
checkpoint: tests/test_evaluate.py)."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from configs import wan21_i2v, wan21_t2v, wan22_t2v
from tests import hosts
from wan import generate, plan
from wan.data import video
from wan.errors import ConfigError, MissingFile


def _config(module=wan21_t2v, **fields):
  c = module.get_config("tiny")
  c.update(dict(dict(job="generate", num_inference_steps=2), **fields))
  return c


def test_two_processes_write_playable_mp4s_and_contact_sheets_as_one_process(tmp_path):
  """The command as two hosts of one device each (jax.distributed on CPU; host 0 writes): the
  videos decode back, and their frames equal one 8-device process's within one level of 255."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red ball rolls\n\n  waves at night  \n")
  fields = dict(job="generate", prompts_file=str(prompts), num_inference_steps=3,
                negative_prompt="blurry", num_frames=9)
  procs = hosts.start(2, 1, f"--config.output_dir={tmp_path / 'two'}",
                      *(f"--config.{k}={v}" for k, v in fields.items()))
  here = generate.run(plan.generation(_config(**fields, output_dir=str(tmp_path / "one")),
                                      jax.devices()))
  outputs = hosts.finish(procs, 600)
  out = tmp_path / "two" / "wan21_t2v_tiny" / "samples" / "base"
  assert sorted(os.listdir(out)) == ["000_a_red_ball_rolls.mp4", "000_a_red_ball_rolls.png",
                                     "001_waves_at_night.mp4", "001_waves_at_night.png"]
  for name, mine in zip(("000_a_red_ball_rolls", "001_waves_at_night"), here):
    info = video.probe(str(out / f"{name}.mp4"))
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 64, 64, 16.0)
    assert video.read(str(out / f"{name}.mp4")).shape == (9, 64, 64, 3)
    sheet = np.asarray(Image.open(out / f"{name}.png")).astype(int)
    assert sheet.shape == (3 * 64, 3 * 64, 3)  # 9 frames in a 3 x 3 grid
    want = np.asarray(Image.open(mine[:-4] + ".png")).astype(int)
    assert sheet.std() > 10 and np.abs(sheet - want).max() <= 1
  assert "sampling [" in outputs[0] and "2 prompt(s)" in outputs[0]
  assert "sampling [" not in outputs[1]  # host 1 computes, says nothing


def test_image_to_video(tmp_path):
  image = tmp_path / "cat.png"
  y, x = np.mgrid[0:40, 0:56]
  Image.fromarray(np.stack([x * 4, y * 5, x + y], -1).astype(np.uint8)).save(image)
  with pytest.raises(ConfigError, match="generates image-to-video: set image"):
    plan.generation(_config(wan21_i2v, prompt="a cat", output_dir=str(tmp_path)), jax.devices())
  gen = plan.generation(_config(wan21_i2v, prompt="a cat", image=str(image),
                                output_dir=str(tmp_path)), jax.devices())
  (path,) = generate.run(gen)
  assert video.probe(path).num_frames == 5


@pytest.mark.parametrize("fields, error, message", [
    (dict(), ConfigError, "set prompt"),
    (dict(prompt="a", prompts_file="p.txt"), ConfigError, "not both"),
    (dict(prompt="a", prompts_file=""), None, None),
    (dict(prompts_file="/nonexistent/p.txt"), MissingFile, "does not exist"),
    (dict(prompt="a", sampler="ddim"), ConfigError, "sampler='ddim' is not one of"),
    (dict(prompt="a", guidance_scale_2=3.0), ConfigError, "applies to the two-expert"),
    (dict(prompt="a", image="/tmp/x.png"), ConfigError, "takes no image"),
    (dict(prompt="a", num_frames=8), ConfigError, "num_frames=8 must be 4k"),
    (dict(prompt="a", height=72), ConfigError, "height=72 must be a multiple of 16"),
    (dict(prompt="a", num_inference_steps=0), ConfigError, "num_inference_steps=0 must be"),
])
def test_bad_settings_are_refused_before_any_work(fields, error, message):
  c = _config(**fields)
  if error is None:
    assert plan.generation(c, jax.devices()).sampling.prompts == ("a",)
    return
  with pytest.raises(error, match=message):
    plan.generation(c, jax.devices())


def test_a14b_takes_the_second_guidance_and_the_model_frame_rate(tmp_path):
  gen = plan.generation(_config(wan22_t2v, prompt="a", guidance_scale_2=2.5,
                                output_dir=str(tmp_path)), jax.devices())
  assert gen.sampling.guidance_scale_2 == 2.5 and gen.boundary == 0.875
  assert gen.sampling.fps == 16.0 and gen.sampling.flow_shift == 12.0
