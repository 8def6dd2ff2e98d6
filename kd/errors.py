"""The one exception type that the scripts turn into a single line on stderr and a non-zero exit."""


class UserError(Exception):
    """Bad input or an environment problem the user can fix; the message says how."""
