"""The one base class of the errors a user can fix: bad configuration, input files, checkpoints, weights.

Every entry point (`cli.reports_user_errors`) prints such an error as one line, `error: ...`, and exits
with status 2; `--verbose` adds the traceback. Any other exception is a bug of ours and keeps its
traceback. Each module defines its own subclasses (`ConfigError`, `DataError`, `CheckpointError`, ...)
beside the code that raises them.
"""


class UserError(Exception):
    """A problem in what the user gave (a config key, a file, a checkpoint) that the message says how to fix."""
