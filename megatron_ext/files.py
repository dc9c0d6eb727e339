"""Writing output files so that a reader never sees a half-written one."""

from __future__ import annotations

import os


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic on POSIX file systems; after an error the temporary is removed
    and ``path`` keeps whatever it held before.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
