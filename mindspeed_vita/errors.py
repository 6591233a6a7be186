"""Errors that mean "the user's input is wrong", as opposed to a bug.

The CLI prints these as one clear line (no traceback). Each message names the file, line,
key or tensor at fault.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the offending value.
    (`config.schema` re-exports it; the parallel rules raise it without importing the schema.)"""


class UserInputError(ValueError):
    """Bad input: a file, checkpoint, image, prompt or option. The message names it."""


class CheckpointError(UserInputError):
    """A checkpoint that is missing, incomplete, or disagrees with the config."""
