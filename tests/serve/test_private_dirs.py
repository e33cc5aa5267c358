"""system.private_dir: the daemon's directories are 0700 and its own at every start (docs/trust.md)."""

import os

import pytest

from lazyfs.errors import ConfigError
from lazyfs.serve import system


def test_made_private_and_forced_back_every_call(tmp_path):
    path = tmp_path / "a" / "run"
    assert system.private_dir(path) == str(path)
    assert oct(path.stat().st_mode & 0o7777) == "0o700"
    os.chmod(path, 0o755)  # made readable by another tool, or an older lazyfs
    system.private_dir(path)
    assert oct(path.stat().st_mode & 0o7777) == "0o700"


def test_a_symlink_a_file_or_another_users_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    for name in ("link", "file"):
        with pytest.raises(ConfigError, match="must be a directory"):
            system.private_dir(tmp_path / name)
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)  # someone made it first, to watch or to plant files
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        system.private_dir(theirs)
    assert oct(theirs.stat().st_mode & 0o777) == "0o755"  # left as it was
