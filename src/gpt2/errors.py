"""The one exception type that means "the user asked for something we cannot do".

The command line turns a `UserError` into a single line on stderr and exit code 2; any other
exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, options or files, explained in one line."""
