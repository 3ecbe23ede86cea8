"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero."""


class SamTrainError(Exception):
    """A problem with the user's input (config, data path, checkpoint) rather than a bug."""
