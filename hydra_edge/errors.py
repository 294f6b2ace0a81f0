"""Error types that a user can cause.

The CLI turns a :class:`HydraEdgeError` into one line on stderr and exit code
``exit_code``: 2 for a usage error, 1 for any other failure.
"""


class HydraEdgeError(Exception):
    """A failure caused by input, files or options, reported without a traceback."""

    exit_code = 1


class UsageError(HydraEdgeError):
    """An option or argument that is invalid before any work starts."""

    exit_code = 2


class CheckpointError(HydraEdgeError):
    """A file that is not a valid hydra-edge checkpoint."""


class BundleError(HydraEdgeError):
    """A bundle folder that is missing a file, altered or of another format."""


class ExportError(HydraEdgeError):
    """An export that failed, including a failed verification against PyTorch."""


class StateError(HydraEdgeError):
    """A saved stream state that does not match the bundle it is loaded into."""
