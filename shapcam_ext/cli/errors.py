"""What the ``shapcam`` command reports as an error rather than a bug, and its exit statuses."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a setup problem, or at least one image failed
EXIT_USAGE = 2  # argparse's own status for bad arguments
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

# What one image may fail on without it being a bug: unreadable files, bad settings,
# non-finite values, a full disk, out of memory. The other images still run.
IMAGE_ERRORS = (ValueError, OSError, RuntimeError)


class CommandError(Exception):
    """A problem that stops the run before any image is explained: the model, layer, weights,
    device, output folder or a missing dependency. Its message is one line naming the fix."""
