"""The one exception type for mistakes a user can fix (bad config, missing file, bad data).

The CLI turns a `UserError` into a single line on stderr and exit code 2, without a
traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input; the message names the problem and the fix."""


EXIT_USER_ERROR = 2
