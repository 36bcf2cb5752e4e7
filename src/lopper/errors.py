class LopperError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""
