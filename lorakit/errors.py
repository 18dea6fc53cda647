"""The one exception type users see: a clear, single-line message and exit code 2."""


class LorakitError(Exception):
    """A problem with the user's input (recipe, paths, data, adapters).

    The CLI prints the message as one line and exits with `exit_code`, without a traceback.
    """

    exit_code = 2
