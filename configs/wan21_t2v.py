"""Wan 2.1 text-to-video. Variants: 14b (default), 1.3b, tiny (CPU, synthetic data).

  python launch.py --config=configs/wan21_t2v.py:1.3b --config.ici_fsdp=8
"""

from configs import base


def get_config(variant="14b"):
  return base.for_model(
      variant,
      {"14b": "wan2.1-t2v-14b",
       "1.3b": ("wan2.1-t2v-1.3b", dict(height=480, width=832))},  # its native resolution
      run_name="wan21_t2v", model_name="wan2.1", model_type="T2V")
