"""The one error type users see: a message that names the file, row or field and says what to do."""


class LorafitError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits with 2."""


class Interrupted(LorafitError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 130."""

    exit_code = 130
