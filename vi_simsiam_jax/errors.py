"""Errors that are the user's to fix: entry points print them as one paragraph and exit
non-zero, without a traceback (absl's usage-error convention); any other exception is a
programming error and keeps its traceback."""


class UserError(ValueError):
    """A mistake in what the user typed: a flag, a config value, a path.

    `setting` names it as the library sees it ("config.archive", "workdir"); the entry point
    shows it as typed on the command line (`--config.archive=/tmp/x.tgz`) when it was typed
    there, and as the config file's value otherwise.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


class MissingPath(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
