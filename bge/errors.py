"""The one exception type a user should ever see: a problem with their input, printed as one line."""


class UserError(Exception):
    """Bad input or environment (a malformed file, a missing model, no network): the CLIs print
    `error: <message>` and exit 2 instead of showing a traceback."""
