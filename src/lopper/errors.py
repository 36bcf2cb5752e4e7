class LopperError(Exception):
    """A problem with the user's input. The message names the problem and the fix, on one line."""


def one_line(e: Exception) -> str:
    """An underlying exception's message, whitespace collapsed and cut to 200 characters, to quote inside a
    LopperError's one line."""
    s = " ".join(str(e).split())
    return s if len(s) < 200 else s[:197] + "..."
