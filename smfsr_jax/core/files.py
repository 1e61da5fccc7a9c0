"""Output folders: checked for writing before a command does any work."""

import os
import tempfile

from smfsr_jax.core import errors


def check_writable(directory: str):
    """Create `directory` and write and delete a file in it, so that a run whose outputs cannot be saved stops
    before any work; raises a UserError naming the path and the OS reason."""
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise errors.UserError(f"the output directory {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        failed = f" ({e.filename})" if e.filename and e.filename != directory else ""
        raise errors.UserError(f"cannot create the output directory {directory}{failed}: {e.strerror or e}") from e
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise errors.UserError(f"cannot write in the output directory {directory}: {e.strerror or e}") from e
