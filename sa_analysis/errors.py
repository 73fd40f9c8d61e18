"""One exception type for user mistakes: the CLI prints its message as one sentence and exits 1."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, unknown model); the message says what and how."""
