"""Shared test helpers: skip, with the reason printed, only where the host lacks a feature.

Tests marked ``fuse`` or ``loop`` get the matching check automatically; other tests call
`require_root`, `require_fuse` or `require_loop` themselves.
"""

from __future__ import annotations

import functools
import os
import subprocess

import pytest


@functools.cache
def _missing_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root"


@functools.cache
def _missing_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this host"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    return None


@functools.cache
def _missing_loop() -> str | None:
    if (reason := _missing_root()) is not None:
        return f"loop devices {reason}"
    try:
        found = subprocess.run(
            ["losetup", "-f"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"losetup -f failed: {exc}"
    device = found.stdout.strip()
    if found.returncode != 0 or not device:
        return f"no free loop device (losetup -f: {found.stderr.strip() or found.returncode})"
    if not os.path.exists(device):
        return f"losetup -f names {device}, which has no device node here"
    return None


def require_root() -> None:
    """Skip the calling test unless running as root."""
    if (reason := _missing_root()) is not None:
        pytest.skip(reason)


def require_fuse() -> None:
    """Skip the calling test unless /dev/fuse can be opened and pyfuse3 imports."""
    if (reason := _missing_fuse()) is not None:
        pytest.skip(reason)


def require_loop() -> None:
    """Skip the calling test unless running as root with a free loop device."""
    if (reason := _missing_loop()) is not None:
        pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    # Skip reasons must be printed even if addopts (-ra) is overridden on the command line.
    chars = config.option.reportchars
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars.replace("N", "") + "s"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        require_fuse()
    if item.get_closest_marker("loop") is not None:
        require_loop()
