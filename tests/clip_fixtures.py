"""Folders of generated clips for the data tests and benchmarks/prepare.py: several sizes, aspect
ratios, frame rates and lengths, an image, and the bad cases a real folder has."""

import os

import av
import numpy as np
from PIL import Image

# name: (frames, fps, height, width)
CLIPS = {
    "wide": (24, 24.0, 48, 80),
    "tall": (12, 16.0, 80, 48),
    "square": (30, 30.0, 64, 64),
    "short": (2, 16.0, 64, 64),  # too short for 5 frames at 16 fps
}
IMAGE = ("still", 56, 72)
BAD = {"corrupt.mp4": "not a video", "empty.mp4": "", "nocaption.mp4": None}


def write_video(path, frames: int, fps: float, height: int, width: int, seed: int = 0):
  """An h264 mp4 of smooth moving colour gradients (so the VAE sees structure, not noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  phase = rng.uniform(0, 2 * np.pi, 3)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=round(fps) if fps == round(fps) else fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for t in range(frames):
      rgb = np.stack([127 + 120 * np.sin(x / 9 + y / 13 + t / 3 + p) for p in phase], -1)
      frame = av.VideoFrame.from_ndarray(rgb.astype(np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def make_folder(directory, with_bad: bool = True) -> str:
  """Writes the clips (with same-name .txt captions) into `directory`; returns it."""
  os.makedirs(directory, exist_ok=True)
  for i, (name, (frames, fps, h, w)) in enumerate(CLIPS.items()):
    write_video(os.path.join(directory, f"{name}.mp4"), frames, fps, h, w, seed=i)
    with open(os.path.join(directory, f"{name}.txt"), "w") as f:
      f.write(f"a {name} clip of moving colours")
  name, h, w = IMAGE
  y, x = np.mgrid[0:h, 0:w]
  Image.fromarray(np.stack([x * 3, y * 3, x + y], -1).astype(np.uint8)).save(
      os.path.join(directory, f"{name}.png"))
  with open(os.path.join(directory, f"{name}.txt"), "w") as f:
    f.write("a still image")
  if with_bad:
    for name, content in BAD.items():
      path = os.path.join(directory, name)
      if content is None:
        write_video(path, 9, 16.0, 32, 32)
      else:
        with open(path, "w") as f:
          f.write(content)
        with open(path[:-4] + ".txt", "w") as f:
          f.write("a broken file")
  return str(directory)
