"""Errors that mean "the input is wrong, and here is what to change".

The launcher prints a `UserError`'s message alone (no traceback; `--verbose` shows one). Each also
derives from the builtin a caller would catch without knowing this module (ValueError,
FileNotFoundError, NotImplementedError).
"""


class UserError(Exception):
  """Bad input that the user can fix: a config value, a path, a checkpoint or data file."""


class ConfigError(UserError, ValueError):
  """A config field has a wrong value, or one that does not fit the devices or the model."""


class NotImplementedYet(UserError, NotImplementedError):
  """A config field of a feature that is not built yet was given a non-default value."""


class CheckpointError(UserError, ValueError):
  """A weights file or training checkpoint cannot be read, or does not fit the model."""


class MissingFile(UserError, FileNotFoundError):
  """A file or directory that the config names does not exist or lacks what it should hold."""


class BadSample(UserError, ValueError):
  """One data file cannot be used (unreadable, corrupt, empty, too short or too small). Data
  preparation skips it and lists `path` with `reason`; it never stops a job."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path, self.reason = str(path), reason


class TrainingStopped(UserError, RuntimeError):
  """Training cannot go on as configured (e.g. max_nonfinite_steps non-finite steps in a row);
  the checkpoints already written are good ones."""
