"""The one exception type users see: a message that names the bad input and the fix."""


class UserError(Exception):
    """A problem with the user's input (file, flag, config), not a bug.

    Scripts catch it, print ``error: <message>`` on one line and exit with code 2.
    """

    exit_code = 2
