"""File writing shared by every command: a file is either its old self or its complete new self, never half."""
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = '.tmp') -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``, so that a kill
    or a full disk never leaves half a file (the previous one stays intact). The file gets the mode that the
    umask gives a new file, not mkstemp's 0600. ``suffix`` ends the temporary name (for writers that go by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)
