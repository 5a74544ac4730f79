"""Writing files so that a reader sees the old content or the new, never a part."""

import contextlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def replaced_on_success(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yields a temporary path beside `path`; the file written there replaces `path` when the
    block ends.

    On any error (a full disk, a failed computation) the temporary file is removed and `path`
    is left as it was; an OSError is raised again naming `path`.
    """
    path = os.fspath(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        if isinstance(error, OSError) and path not in str(error):
            message = f"Could not write {path}: {error.strerror or error}"
            raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """`open(path, mode)` through `replaced_on_success`."""
    with replaced_on_success(path) as temporary, open(temporary, mode) as f:
        yield f
