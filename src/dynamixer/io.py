"""File writing shared by every command: a file is either its old self or its complete new self, never half."""
import errno
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable


def default_cache_dir() -> Path:
    """Where decoded datasets and other derived data are kept: $XDG_CACHE_HOME/dynamixer or ~/.cache/dynamixer."""
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'dynamixer'


class DiskFullError(OSError):
    """The disk filled up during a write; the message says what survived and what to do."""

    def __str__(self) -> str:
        return self.strerror


def _alive(pid: str) -> bool:
    """Whether process ``pid`` of this host still runs (its temporary files are then still being written)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = '.tmp') -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``, so that a kill
    or a full disk never leaves half a file (the previous one stays intact). The file gets the mode that the
    umask gives a new file, not mkstemp's 0600. ``suffix`` ends the temporary name (for writers that go by it).
    Temporary files left by killed writers are deleted; those of live ones (other DDP ranks writing the same
    cache, say) are not: the name carries the writer's host and process id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace('.', '-')
    for stale in path.parent.glob(f'.{path.name}.{host}.*{suffix}'):
        if not _alive(stale.name[len(f'.{path.name}.{host}.'):].split('.')[0]):  # its writer was killed mid-write
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.{host}.{os.getpid()}.', suffix=suffix)
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = f'the previous {path.name} is intact' if path.exists() else f'{path.name} was not written'
            raise DiskFullError(e.errno, f'no space left on the device while writing {path}; {kept}. Free some '
                                         f'space and run again (a training run continues with --resume).') from None
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
