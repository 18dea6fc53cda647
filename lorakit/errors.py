"""The one exception type users see: a clear, single-line message and exit code 2."""


class LorakitError(Exception):
    """A problem with the user's input (recipe, paths, data, adapters).

    The CLI prints the message as one line and exits with code 2, without a traceback.
    """
