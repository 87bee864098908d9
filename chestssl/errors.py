"""The base of errors whose message tells the user what is wrong and how to fix it.

Stage scripts print such an error's message alone (no traceback) and exit with status 1.
"""


class UserError(Exception):
    """An error caused by input or configuration, with an actionable message."""
