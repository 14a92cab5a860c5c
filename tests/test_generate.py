"""job=generate end to end on the tiny configs: the command line, mp4s decoded back, prompts
files, image-to-video, and the refusals (sampling from a training run's checkpoint:
tests/test_evaluate.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import wan21_i2v, wan21_t2v, wan22_t2v
from tests import xla_env
from wan import generate, plan
from wan.data import video
from wan.errors import ConfigError, MissingFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(module=wan21_t2v, **fields):
  c = module.get_config("tiny")
  c.update(dict(dict(job="generate", num_inference_steps=2), **fields))
  return c


def test_the_command_writes_playable_mp4s_and_contact_sheets(tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red ball rolls\n\n  waves at night  \n")
  env = xla_env.env(2, JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch.py"), "--config=configs/wan21_t2v.py:tiny",
       "--config.job=generate", f"--config.prompts_file={prompts}",
       "--config.num_inference_steps=3", "--config.negative_prompt=blurry",
       "--config.num_frames=9", f"--config.output_dir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  out = tmp_path / "wan21_t2v_tiny" / "samples" / "base"
  assert sorted(os.listdir(out)) == ["000_a_red_ball_rolls.mp4", "000_a_red_ball_rolls.png",
                                     "001_waves_at_night.mp4", "001_waves_at_night.png"]
  for name in ("000_a_red_ball_rolls", "001_waves_at_night"):
    info = video.probe(str(out / f"{name}.mp4"))
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 64, 64, 16.0)
    assert video.read(str(out / f"{name}.mp4")).shape == (9, 64, 64, 3)
    sheet = np.asarray(Image.open(out / f"{name}.png"))
    assert sheet.shape == (3 * 64, 3 * 64, 3)  # 9 frames in a 3 x 3 grid
  assert "sampling [" in r.stderr and "2 prompt(s)" in r.stdout


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
