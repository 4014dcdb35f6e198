"""The one exception type the CLI turns into a clean one-line error (exit code 2)."""


class LMForgeError(Exception):
    """A problem with the user's input: reported as one line on stderr, no traceback."""


class PeerFailed(LMForgeError):
    """Under torchrun, another rank (rank 0) failed; that rank reports the cause."""
