"""Where results land: files that appear whole or not at all, and block names that become
paths only inside their own directory.

A block name is data from a file or a peer, never a path: :func:`block_components` is the
one place that turns it into path components (``..``, control characters and empty names
refused; ``/``, ``//`` and ``./`` folded, so an absolute name stays inside), and
:class:`PathPlan` refuses two names that would land on the same file.  Files are
created relative to a directory fd, each directory below it opened with ``O_NOFOLLOW``,
so a planted or dangling symlink is never followed.

A :class:`NewFile` is written under no name at all (``O_TMPFILE``) where the filesystem
allows, else under a random ``O_EXCL`` name that it keeps locked; ``commit()`` fsyncs it
and renames it over the final name (then fsyncs the directory), ``abort()`` makes it
vanish.  Named temporaries left by a crash are removed by the next writer of the same
file (a lock tells a stale one from one still being written).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
from typing import Dict, List, Optional, Tuple

from qfram._util.text import printable
from qfram.errors import OptionError, FormatError

TEMP_MARK = ".qfram-tmp-"
NAME_MAX = 255                  # bytes in one file name (Linux's filesystems)
RANDOM_TAIL = 12                # hex digits that make a temporary name unique


def block_components(name: str, offset: int = -1) -> Tuple[str, ...]:
    """The path components a block's file has inside an output directory: ``/`` makes
    folders (as QEMU's analyze-migration does), empty and ``.`` components are dropped
    (a leading ``/`` cannot escape), ``..`` and control characters are refused."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise FormatError(f"block name {printable(name)!r} holds control characters: it "
                          f"cannot be a file name", offset)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        raise FormatError(f"block name {name!r} names no file", offset)
    if ".." in parts:
        raise FormatError(f"block name {name!r} climbs out of its directory ('..')", offset)
    return parts


class PathPlan:
    """Block names given one by one, each checked against those before it: two names
    for one file (``a/b``, ``a//b``, ``./a/b``) or a file that another name needs as a
    folder (``a`` and ``a/b``) are refused."""

    def __init__(self) -> None:
        self.owner: Dict[Tuple[str, ...], str] = {}

    def add(self, name: str, offset: int = -1) -> Tuple[str, ...]:
        parts = block_components(name, offset)
        if parts in self.owner:
            raise FormatError(f"block names {self.owner[parts]!r} and {name!r} would both "
                              f"be written to {'/'.join(parts)}", offset)
        for i in range(1, len(parts)):
            if parts[:i] in self.owner:
                raise FormatError(f"block {name!r} needs {'/'.join(parts[:i])} as a folder; "
                                  f"block {self.owner[parts[:i]]!r} is a file there", offset)
        for other, owner in self.owner.items():
            if other[:len(parts)] == parts:
                raise FormatError(f"block {owner!r} needs {'/'.join(parts)} as a folder; "
                                  f"block {name!r} is a file there", offset)
        self.owner[parts] = name
        return parts


class Directory:
    """An open directory; files and folders are made relative to it."""

    def __init__(self, path: str, *, create: bool = False,
                 _fd: Optional[int] = None) -> None:
        self.path = path
        self.made: List[str] = []          # folders made here, for remove_made()
        if _fd is not None:
            self.fd = _fd
            return
        if create and not os.path.isdir(path):
            os.makedirs(path)
            self.made.append(path)
        # the caller's own path may pass through symlinks it chose; nothing below does
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def folder(self, parts: Tuple[str, ...]) -> "Directory":
        """The folder ``parts`` below this one, made where missing; a symlink on the way
        is refused (ELOOP from O_NOFOLLOW), never followed."""
        fd = os.dup(self.fd)
        path = self.path
        try:
            for part in parts:
                path = os.path.join(path, part)
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    self.made.append(path)
                except FileExistsError:
                    pass
                try:
                    sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise OSError(exc.errno, f"{path} is not a folder qfram made (a "
                                                 f"symlink or a file): refusing to write "
                                                 f"through it") from None
                    raise
                os.close(fd)
                fd = sub
        except BaseException:
            os.close(fd)
            raise
        return Directory(path, _fd=fd)

    def new_file(self, name: str, mode: int = 0o644, *, named: bool = False) -> "NewFile":
        return NewFile(self, name, mode, named=named)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def remove_made(self) -> None:
        """Take away the folders made here that are still empty (after a failure)."""
        for path in reversed(self.made):
            try:
                os.rmdir(path)
            except OSError:
                pass
        self.made.clear()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def hidden_name(name: str, mark: str) -> str:
    """``.NAME<mark>``, to which a random tail of RANDOM_TAIL hex digits is added: the
    names of a file's temporaries.  They always fit NAME_MAX: a long NAME is cut to its
    start (whole bytes of it) and a hash of all of it, so two long names that begin
    alike never share temporaries."""
    encoded = os.fsencode(name)
    room = NAME_MAX - 1 - len(mark) - RANDOM_TAIL
    if len(encoded) <= room:
        return f".{name}{mark}"
    digest = hashlib.blake2b(encoded, digest_size=8).hexdigest()
    start = encoded[:room - 1 - len(digest)].decode("utf-8", "ignore")   # whole characters
    return f".{start}~{digest}{mark}"


def _remove_stale_temporaries(directory: Directory, name: str) -> None:
    """Named temporaries of ``name`` that nobody holds locked were left by a crash."""
    prefix = hidden_name(name, TEMP_MARK)
    for entry in os.listdir(directory.fd):
        if not entry.startswith(prefix):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=directory.fd)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)            # a writer still holds it
            continue
        try:
            os.unlink(entry, dir_fd=directory.fd)
        except OSError:
            pass
        os.close(fd)


class NewFile:
    """A file that appears under ``name`` in ``directory`` only when ``commit()`` says
    it is whole.  ``fd`` is open read-write; ``path`` names it for messages."""

    def __init__(self, directory: Directory, name: str, mode: int = 0o644, *,
                 named: bool = False, owns_directory: bool = False) -> None:
        self.owns_directory = owns_directory
        if "/" in name or name in ("", ".", ".."):
            raise OptionError(f"not a file name: {name!r}")
        self.directory = directory
        self.name = name
        self.path = os.path.join(directory.path, name)
        self.mode = mode
        self.temp_name: Optional[str] = None
        self.fd = -1
        _remove_stale_temporaries(directory, name)
        if not named:
            try:
                self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode,
                                  dir_fd=directory.fd)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
        if self.fd < 0:
            self.temp_name = hidden_name(name, TEMP_MARK) + \
                secrets.token_hex(RANDOM_TAIL // 2)
            self.fd = os.open(self.temp_name, os.O_RDWR | os.O_CREAT | os.O_EXCL
                              | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory.fd)
            fcntl.flock(self.fd, fcntl.LOCK_EX)     # held until commit or abort

    @property
    def where(self) -> str:
        """Where the bytes are until commit (for a message that must name them)."""
        if self.temp_name is not None:
            return os.path.join(self.directory.path, self.temp_name)
        return f"{self.path} (unnamed, being written)"

    def keep_as(self, mark: str) -> str:
        """Give the unfinished file a name of its own (``.NAME<mark>`` and a random
        tail) and leave it: for bytes that must outlive a failure.  Returns its path."""
        kept = hidden_name(self.name, mark) + secrets.token_hex(RANDOM_TAIL // 2)
        if self.temp_name is None:
            os.link(f"/proc/self/fd/{self.fd}", kept, dst_dir_fd=self.directory.fd,
                    follow_symlinks=True)
        else:
            os.rename(self.temp_name, kept, src_dir_fd=self.directory.fd,
                      dst_dir_fd=self.directory.fd)
            self.temp_name = None
        path = os.path.join(self.directory.path, kept)
        self._finish()
        return path

    def commit(self, sync: bool = True) -> None:
        """Make the file durable and give it its name, replacing what was there (a
        symlink there is replaced, not followed).  On failure the file stays open and
        unnamed: the caller may still read it back, then ``abort()``."""
        if sync:
            os.fsync(self.fd)
        dfd = self.directory.fd
        if self.temp_name is None:
            # an O_TMPFILE file gets a random name first: linkat cannot replace
            self.temp_name = (hidden_name(self.name, TEMP_MARK)
                              + secrets.token_hex(RANDOM_TAIL // 2))
            os.link(f"/proc/self/fd/{self.fd}", self.temp_name, dst_dir_fd=dfd,
                    follow_symlinks=True)
        os.rename(self.temp_name, self.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        self.temp_name = None
        if sync:
            self.directory.fsync()
        self._finish()

    def abort(self) -> None:
        """Forget the file: nothing of it remains."""
        if self.temp_name is not None:
            try:
                os.unlink(self.temp_name, dir_fd=self.directory.fd)
            except OSError:
                pass
            self.temp_name = None
        self._finish()

    def _finish(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.owns_directory:
            self.directory.close()

    def __enter__(self) -> "NewFile":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if self.fd >= 0:
            if exc_type is None:
                self.commit()
            else:
                self.abort()


def new_file(path: str, mode: int = 0o644, *, named: bool = False) -> NewFile:
    """A :class:`NewFile` that will become ``path`` (its folder must exist)."""
    parent, name = os.path.split(os.path.abspath(path))
    directory = Directory(parent)
    try:
        return NewFile(directory, name, mode, named=named, owns_directory=True)
    except BaseException:
        directory.close()
        raise


class BlockFiles:
    """The files RAM blocks are restored into — ``target`` itself when ``single``, else
    one file per block under the directory ``target`` (block names planned with
    :class:`PathPlan`) — which appear together on ``commit()``, or not at all."""

    def __init__(self, target: str, *, single: bool) -> None:
        self.target = target
        self.single = single
        self.plan = PathPlan()
        self.files: Dict[str, NewFile] = {}
        self.root = Directory(os.path.dirname(os.path.abspath(target)) if single else target,
                              create=not single)

    def new(self, name: str, offset: int = -1) -> NewFile:
        """The new file for block ``name``."""
        if self.single:
            if self.files:
                raise FormatError(f"a second block {name!r}: a file holds one block; name a "
                                  f"directory for several", offset)
            out = self.root.new_file(os.path.basename(os.path.abspath(self.target)))
        else:
            parts = self.plan.add(name, offset)
            folder = self.root.folder(parts[:-1])
            out = NewFile(folder, parts[-1], owns_directory=True)
        self.files[name] = out
        return out

    def path_of(self, name: str) -> str:
        return self.files[name].path

    def commit(self) -> None:
        """Sync every file, then name them all."""
        for out in self.files.values():
            os.fsync(out.fd)
        for out in self.files.values():
            out.commit(sync=False)
        self.root.fsync()
        self.root.close()

    def abort(self) -> None:
        for out in self.files.values():
            out.abort()
        self.root.remove_made()
        self.root.close()
