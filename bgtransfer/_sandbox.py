"""The per-app sandbox on disk: ``<data_root>/apps/<app>/shared/transfers/``.

Every path is opened component by component relative to the sandbox root with
``O_NOFOLLOW``, so neither a symlink present at ``add`` nor one swapped in later can lead a
transfer outside the sandbox. Symlinks inside the sandbox are refused outright: simpler to
reason about than following them and checking where they land.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from ._exceptions import SandboxError, TransferError
from ._settings import Settings


class MissingPathError(TransferError):
    """A path component does not exist (yet)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_root(settings: Settings, app_id: str) -> int:
    """A descriptor of the app's sandbox root, created if missing (as the phone does at install)."""
    root = os.path.join(settings.data_root, "apps", app_id, "shared", "transfers")
    try:
        return os.open(root, _DIR_FLAGS)
    except FileNotFoundError:  # (opened first: every add and attempt comes here)
        os.makedirs(root, exist_ok=True)
        return os.open(root, _DIR_FLAGS)


@contextlib.contextmanager
def parent_dir(settings: Settings, app_id: str, parts: tuple[str, ...], create: bool) -> Iterator[int]:
    """A descriptor of the directory holding ``parts[-1]``, reached without following links."""
    fd = _open_root(settings, app_id)
    try:
        for name in parts[:-1]:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _path_error(exc, name) from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _path_error(exc: OSError, name: str) -> TransferError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return SandboxError(f"path component {name!r} is a symlink or not a directory")
    if exc.errno == errno.ENOENT:
        return MissingPathError(f"path component {name!r} does not exist")
    return TransferError(f"cannot open {name!r}: {exc.strerror}")


def open_file(dir_fd: int, name: str, flags: int) -> int:
    """Open ``name`` in ``dir_fd`` refusing a symlink; the error names the file."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        raise _path_error(exc, name) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError(f"{name!r} is not a regular file")
    return fd


def check_target(settings: Settings, app_id: str, parts: tuple[str, ...]) -> None:
    """At ``add``: a download target may not exist yet, but must not be a link or a directory."""
    try:
        with parent_dir(settings, app_id, parts, create=False) as fd:
            st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, MissingPathError):
        return  # missing directories are created when the transfer starts
    if stat.S_ISLNK(st.st_mode):
        raise SandboxError(f"download target {parts[-1]!r} is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise TransferError(f"download target {parts[-1]!r} exists and is not a regular file")


def upload_size(settings: Settings, app_id: str, parts: tuple[str, ...]) -> int:
    """At ``add``: the upload source must be a regular file in the sandbox; its size."""
    with parent_dir(settings, app_id, parts, create=False) as dfd:
        fd = open_file(dfd, parts[-1], os.O_RDONLY)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)


def partial_name(parts: tuple[str, ...], request_id: str) -> str:
    """The hidden partial file beside a download's target (same directory, so rename is atomic)."""
    return f".{parts[-1]}.{request_id}.part"


def delete_partial(settings: Settings, app_id: str, parts: tuple[str, ...], request_id: str) -> None:
    """Delete a download's partial file if it can be reached without following a link (a path
    swapped for a symlink leads nowhere we may delete), and unless an attempt is writing it
    (it holds the file's lock: a newer attempt of the same request, after a lease was lost).
    Best effort: a file that cannot be deleted is left, and the next attempt truncates it."""
    name = partial_name(parts, request_id)
    with contextlib.suppress(OSError, TransferError), \
            parent_dir(settings, app_id, parts, create=False) as dfd:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(fd)
