"""dynamixer.io.atomic_write: whole files only, the umask's mode, and what killed writers leave behind."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from dynamixer.io import DiskFullError, atomic_write, write_text


def test_files_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / 'a.txt', 'x')
        os.umask(0o077)
        write_text(tmp_path / 'b.txt', 'x')
    finally:
        os.umask(old)
    assert (tmp_path / 'a.txt').stat().st_mode & 0o777 == 0o644
    assert (tmp_path / 'b.txt').stat().st_mode & 0o777 == 0o600


def test_a_killed_writers_temporary_file_goes_and_a_live_ones_stays(tmp_path):
    host = socket.gethostname().replace('.', '-')
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead = tmp_path / f'.model.bin.{host}.{int(gone.stdout)}.abc.tmp'
    live = tmp_path / f'.model.bin.{host}.{os.getppid()}.def.tmp'  # our parent: alive, writing the same file
    dead.write_text('half')
    live.write_text('in progress')
    write_text(tmp_path / 'model.bin', 'whole')
    assert (tmp_path / 'model.bin').read_text() == 'whole'
    assert not dead.exists() and live.exists()


@pytest.mark.parametrize('existed', [True, False])
def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, existed):
    target = tmp_path / 'checkpoint.pth'
    if existed:
        target.write_text('old')

    def fill_up(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write('half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(DiskFullError) as error:
        atomic_write(target, fill_up)
    assert ('the previous checkpoint.pth is intact' if existed else 'checkpoint.pth was not written') in str(error.value)
    assert (target.read_text() == 'old') if existed else not target.exists()
    assert os.listdir(tmp_path) == (['checkpoint.pth'] if existed else [])
