"""The one exception type for problems the user can fix.

The CLI reports a `UserError` as a single line naming the problem and the fix, and exits with code 2
without a traceback. Library code raises it for bad configs, malformed task files, impossible
selections and missing models; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input (config, data, paths); the message names the fix."""
