"""The shared state file is safe from other local users: a symbolic link or a file
they plant is refused with a message naming the path, their target is never
written, the default directory is private, and they cannot truncate the file of
a running instance. Another user is ``nobody`` through runuser (root only)."""
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile

import pytest

from odoo_pool_patch.shared import shared_state as ss
from odoo_pool_patch.shared.budget import SharedBudget
from odoo_pool_patch.config.options import Settings
from odoo_pool_patch.pool.connection_pool import ConnectionPool

as_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which('runuser'),
                             reason='needs root and runuser to act as another local user')


def as_nobody(*command):
    return subprocess.run(['runuser', '-u', 'nobody', '--', *command], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def outside():
    """A directory other users can reach (pytest's own are private to us)."""
    directory = tempfile.mkdtemp(prefix='dbp-security-')
    os.chmod(directory, 0o755)
    yield pathlib.Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def public_dir(outside):
    """A world-writable sticky directory, as /dev/shm or /tmp."""
    directory = outside / 'public'
    directory.mkdir()
    os.chmod(directory, 0o1777)
    return directory


@as_root
def test_a_symbolic_link_planted_by_another_user_is_refused(outside, public_dir):
    victim = outside / 'odoo.conf'
    victim.write_text('[options]\nadmin_passwd = secret\n')
    path = public_dir / 'state'
    assert as_nobody('ln', '-s', str(victim), str(path)).returncode == 0
    with pytest.raises(ss.SharedStateError, match=f'{path}: it is a symbolic link'):
        ss.SharedState(str(path))
    assert victim.read_text() == '[options]\nadmin_passwd = secret\n'
    assert os.path.islink(path)
    # Control: the same link made by ourselves is refused too (never followed).
    os.unlink(path)
    os.symlink(victim, path)
    with pytest.raises(ss.SharedStateError, match='symbolic link'):
        ss.SharedState(str(path))
    assert victim.stat().st_size == len('[options]\nadmin_passwd = secret\n')


@as_root
def test_a_file_precreated_by_another_user_is_refused(public_dir):
    path = public_dir / 'state'
    made = as_nobody('sh', '-c', f'umask 0; : > {path}; chmod 666 {path}')
    assert made.returncode == 0, made.stderr
    with pytest.raises(ss.SharedStateError, match=r'belongs to uid \d+, not to this user'):
        ss.SharedState(str(path))
    assert path.stat().st_size == 0        # not formatted, not mapped


def test_our_file_readable_by_others_or_of_another_kind_is_refused(public_dir):
    path = public_dir / 'state'
    path.write_bytes(b'')
    os.chmod(path, 0o644)
    with pytest.raises(ss.SharedStateError, match='has mode 0644: other users may read'):
        ss.SharedState(str(path))
    os.chmod(path, 0o600)
    path.write_bytes(b'not ours' * 4)
    with pytest.raises(ss.SharedStateError, match='is not a db_pooling shared state file'):
        ss.SharedState(str(path))
    assert path.read_bytes() == b'not ours' * 4
    os.link(path, public_dir / 'second-name')
    with pytest.raises(ss.SharedStateError, match='has 2 hard links'):
        ss.SharedState(str(path))


def test_a_new_file_is_0600_and_the_default_directory_private(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, 'private_directory', lambda: str(tmp_path / 'private'))
    os.umask(umask := os.umask(0))          # whatever the umask (0 here)
    try:
        path = ss.default_path('instance')
        assert os.path.dirname(path) == str(tmp_path / 'private')
        state = ss.SharedState(path)
        state.close()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / 'private').st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Opened again: the same file, formatted once.
    again = ss.SharedState(path)
    assert again.cells[ss.H_MAGIC] == ss.MAGIC
    again.close()


@as_root
def test_a_default_directory_made_by_another_user_is_refused(tmp_path, public_dir, monkeypatch):
    private = public_dir / 'odoo-db_pooling-0'
    monkeypatch.setattr(ss, 'private_directory', lambda: str(private))
    assert as_nobody('mkdir', '-m', '700', str(private)).returncode == 0
    with pytest.raises(ss.SharedStateError, match=r'not private to this user'):
        ss.SharedState(ss.default_path('instance'))


def test_a_directory_others_can_write_is_refused(tmp_path):
    directory = tmp_path / 'open'
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(ss.SharedStateError, match='writable by other users .* not sticky'):
        ss.SharedState(str(directory / 'state'))
    assert not (directory / 'state').exists()
    with pytest.raises(ss.SharedStateError, match='does not exist'):
        ss.SharedState(str(tmp_path / 'missing' / 'state'))


@as_root
def test_another_user_cannot_truncate_the_file_of_a_running_instance(pg, info, public_dir):
    path = str(public_dir / 'state')
    pool = ConnectionPool(4, settings=Settings(), budget=SharedBudget(ss.SharedState(path), 4,
                                                                      role='http'))
    try:
        cnx = pool.borrow(info())
        truncated = as_nobody('truncate', '-s', '0', path)
        assert truncated.returncode != 0 and 'Permission denied' in truncated.stderr
        assert os.stat(path).st_size == ss.SIZE
        pool.give_back(cnx)
        again = pool.borrow(info())             # still serving, its bookkeeping intact
        assert pool.budget.state.total_held() == 1
        pool.give_back(again)
    finally:
        pool.shutdown()


def _older_file(path, pid, start):
    """A file as db_pooling's previous format (8) left it, with one process row."""
    cells = [0] * ss.CELLS
    cells[ss.H_MAGIC], cells[ss.H_VERSION] = ss.MAGIC, 8
    cells[ss.PROC_BASE + ss.P_PID], cells[ss.PROC_BASE + ss.P_START] = pid, start
    import array
    path.write_bytes(array.array('q', cells).tobytes() + b'\0' * 4096)   # larger, too
    os.chmod(path, 0o600)


def test_a_file_of_the_older_version_is_reformatted_only_once_its_processes_are_gone(tmp_path):
    path = tmp_path / 'state'
    _older_file(path, os.getpid(), ss.process_start(os.getpid()))    # a live one: us
    with pytest.raises(ss.SharedStateError, match=rf'older db_pooling version \(pids '
                                                  rf'{os.getpid()}\): stop them first'):
        ss.SharedState(str(path))
    assert path.read_bytes()[8:16] == (8).to_bytes(8, 'little')      # untouched
    _older_file(path, os.getpid(), ss.process_start(os.getpid()) + 1)   # gone
    state = ss.SharedState(str(path))
    assert state.cells[ss.H_VERSION] == ss.VERSION and state.cells[ss.PROC_BASE] == 0
    assert os.path.getsize(path) == ss.SIZE + 4096    # never shrunk under a mapping
    state.close()
