"""Directories only their owner can enter (the run directory, the export directory, ...)."""

from __future__ import annotations

import os
import stat

from lazyfs.errors import ConfigError


def private_dir(path: str | os.PathLike) -> str:
    """Make *path* (and missing parents) a directory only its owner can enter: mode 0700, every call.

    Refuses a symlink, or a directory another user owns (someone could have made it first
    to watch or plant files): ConfigError naming the path.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file: said below
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} must be a directory, not a symlink or a file")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): remove it or "
                          f"choose another directory")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
