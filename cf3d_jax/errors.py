"""Error types with messages that name the file, key or value at fault.

Every user-facing failure in cf3d_jax raises a subclass of :class:`Cf3dError`; the CLI
(`cf3d_jax.main`) prints its message and exits non-zero instead of showing a traceback.
"""


class Cf3dError(Exception):
  """Base class: a problem with the user's input, config or files (not a bug)."""


class ConfigError(Cf3dError):
  """A config key is missing, misspelt or has a value outside what is allowed."""


class DataError(Cf3dError):
  """A data file (NIfTI, CSV, shard, embedding table) is missing or malformed."""


class PromptError(Cf3dError):
  """A prompt or prompt class is unknown to the embedding table or the templates."""


class Preempted(Exception):
  """A job stopped on SIGTERM after saving its state (not an input problem: the CLI exits with
  status 143, and rerunning the same command resumes)."""
