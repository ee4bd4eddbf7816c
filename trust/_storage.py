"""Storage checks: what the model's files are, before any byte is hashed.

Every entry is opened with O_NOFOLLOW relative to its parent directory's fd
and checked with fstat on that fd, so a path swapped after the check cannot
be what gets hashed: the hashing reads from the very fds opened here. The
same holds above the model: walk_source opens the trusted source root and
each directory below it down to the model the same way, and open_tree
continues from the fd it ends on, so the model is never looked up by path.
"""
from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field

from .errors import VerificationError

# A signature bundle or pin manifest is small; bigger is an attack or a mistake.
MAX_METADATA_BYTES = 16 << 20
MAX_DEPTH = 64  # deeper nesting is no model layout; it would only exhaust the stack

_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_O_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY


@dataclass
class OpenFile:
    name: str  # relative POSIX path inside the model ("." never: see single-file models)
    path: str  # absolute path, for messages only
    fd: int    # O_RDONLY, CLOEXEC; owned by the Tree
    size: int
    dev_ino: tuple[int, int]


@dataclass
class Tree:
    """The checked content of a model directory (or of a single-file model)."""
    root: str
    single_file: bool
    files: dict[str, OpenFile] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)  # name -> target name, both inside

    def close(self) -> None:
        for f in self.files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1

    def drop(self, name: str) -> None:
        f = self.files.pop(name)
        os.close(f.fd)


_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink", stat.S_IFDIR: "a directory"}


def _kind(mode: int) -> str:
    return _KIND.get(stat.S_IFMT(mode), "not a regular file")


def check_owner_and_mode(path: str, st: os.stat_result, check: str = "storage") -> None:
    """Only root or the daemon itself may be able to change what we load."""
    if st.st_uid not in (0, os.geteuid()):
        raise VerificationError(path, check, f"owned by uid {st.st_uid}, not root or the daemon (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise VerificationError(path, check, f"group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})")


@dataclass
class Source:
    """A model reached from a trusted source root by walk_source."""
    path: str          # the root and the names walked: a real path (no symlink below the root)
    dir_fd: int        # the directory holding the model; with name None, the model directory itself
    name: str | None   # the model's entry in dir_fd
    single_file: bool  # the entry was a regular file when looked at (open_tree checks it again)

    @property
    def at(self) -> tuple[int, str | None]:
        return self.dir_fd, self.name

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def walk_source(root: str, names: list[str]) -> Source:
    """Walks from a source root down to the model `root/names[0]/.../names[-1]`.

    The root is opened O_DIRECTORY|O_NOFOLLOW by its path (the config resolved
    it once); every directory below it is opened O_NOFOLLOW|O_DIRECTORY
    relative to its parent's fd and checked on that fd, like the model's own
    directories: owned by root or the daemon, not group- or world-writable (the
    root too, unless it is the model itself). A symlink anywhere below the root
    is refused, the model's own entry included; that entry is only looked at:
    open_tree opens and checks it relative to the fd returned here.
    """
    try:
        fd = os.open(root, _O_DIR)
    except OSError as e:
        raise VerificationError(root, "source", f"the source root: {_os_reason(e)}") from None
    path = root
    try:
        if names:
            check_owner_and_mode(root, os.fstat(fd), "source")
        for i, name in enumerate(names):
            child = os.path.join(path, name)
            try:
                lst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as e:
                raise VerificationError(child, "source", _os_reason(e)) from None
            if stat.S_ISLNK(lst.st_mode):
                target = os.readlink(name, dir_fd=fd)
                raise VerificationError(child, "source", f"a symlink to {target!r}; below the source {root} "
                                                         "no symlink is followed")
            if i == len(names) - 1:
                return Source(child, fd, name, stat.S_ISREG(lst.st_mode))
            if not stat.S_ISDIR(lst.st_mode):
                raise VerificationError(child, "source", "not a directory")
            try:
                sub = os.open(name, _O_DIR, dir_fd=fd)
            except OSError as e:
                raise VerificationError(child, "source", _os_reason(e)) from None
            os.close(fd)
            fd, path = sub, child
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
                raise VerificationError(child, "source", "replaced while being opened")
            check_owner_and_mode(child, st, "source")
        return Source(root, fd, None, False)
    except BaseException:
        os.close(fd)
        raise


def read_checked(path: str, strict: bool = True, limit: int = MAX_METADATA_BYTES) -> bytes:
    """Reads a small metadata file (signature, pin manifest) with the same checks."""
    try:
        lst = os.stat(path, follow_symlinks=False)
        if stat.S_ISLNK(lst.st_mode):
            raise VerificationError(path, "storage", "a symlink (refused)")
        if not stat.S_ISREG(lst.st_mode):  # never open a device or FIFO
            raise VerificationError(path, "storage", f"{_kind(lst.st_mode)}, not a regular file")
        fd = os.open(path, _O_FILE)
    except FileNotFoundError:
        raise VerificationError(path, "storage", "missing") from None
    except OSError as e:
        raise VerificationError(path, "storage", _os_reason(e)) from None
    try:
        st = _opened_as_checked(path, fd, lst, strict)  # same inode, so still a regular file
        if st.st_size > limit:
            raise VerificationError(path, "size", f"{st.st_size} bytes, more than the {limit} allowed for metadata")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise VerificationError(path, "size", f"grew past the {limit} bytes allowed for metadata")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _opened_as_checked(path: str, fd: int, checked: os.stat_result, strict: bool) -> os.stat_result:
    """fstat of what was opened: the same inode as the one checked by name, and (strict) safely owned."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
        raise VerificationError(path, "storage", "replaced while being opened")
    if strict:
        check_owner_and_mode(path, st)
    return st


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "a symlink (refused)"
    return e.strerror or str(e)


def open_tree(model_path: str, exclude: set[str], strict: bool = True,
              at: tuple[int, str | None] | None = None, store_links: bool = False) -> Tree:
    """Opens and checks every entry of a model directory, or a single-file model.

    `model_path` must already be a real path (no symlinks); with `at`
    (Source.at: a directory fd and the model's name in it, or None when the fd
    is the model directory), the model is opened relative to that fd and
    `model_path` only names it in messages. `exclude` holds
    relative names that are not model files (the signature and release files);
    they are skipped without being opened. Symlinks are recorded, not
    followed; one that leaves the directory is refused here. `strict` adds the
    owner, mode and hard-link checks (the daemon); the publisher signs its
    own files without them. `store_links` (a view of the daemon's content-addressed
    store) accepts extra hard links on files nobody may write (mode without any write
    bit, owned as checked): the store's own blob and other views of the same content.
    """
    dir_fd, name = at if at is not None else (None, model_path)
    try:
        st = os.fstat(dir_fd) if name is None else os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as e:
        raise VerificationError(model_path, "storage", _os_reason(e)) from None
    if stat.S_ISREG(st.st_mode):
        tree = Tree(model_path, single_file=True)
        try:
            fd = os.open(name, _O_FILE, dir_fd=dir_fd)
        except OSError as e:
            raise VerificationError(model_path, "storage", _os_reason(e)) from None
        try:
            _add_file(tree, ".", model_path, fd, st, strict)
        except BaseException:
            os.close(fd)
            raise
        _check_hardlinks(tree, strict, store_links)
        return tree
    if not stat.S_ISDIR(st.st_mode):
        raise VerificationError(model_path, "storage", f"{_kind(st.st_mode)}, not a model directory or file")
    tree = Tree(model_path, single_file=False)
    try:
        fd = os.dup(dir_fd) if name is None else os.open(name, _O_DIR, dir_fd=dir_fd)
    except OSError as e:
        raise VerificationError(model_path, "storage", _os_reason(e)) from None
    try:
        _opened_as_checked(model_path, fd, st, strict)
        _walk(tree, fd, "", exclude, strict)
        _check_hardlinks(tree, strict, store_links)
    except BaseException:
        tree.close()
        raise
    finally:
        os.close(fd)
    return tree


def _add_file(tree: Tree, name: str, path: str, fd: int, lst: os.stat_result, strict: bool) -> None:
    if not stat.S_ISREG(lst.st_mode):
        raise VerificationError(path, "storage", f"{_kind(lst.st_mode)}, not a regular file")
    st = _opened_as_checked(path, fd, lst, strict)
    tree.files[name] = OpenFile(name, path, fd, st.st_size, (st.st_dev, st.st_ino))


def _walk(tree: Tree, dir_fd: int, rel_dir: str, exclude: set[str], strict: bool) -> None:
    if rel_dir.count("/") >= MAX_DEPTH:
        raise VerificationError(os.path.join(tree.root, rel_dir), "storage", f"nested more than {MAX_DEPTH} directories deep")
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it)
    for entry in names:
        name = f"{rel_dir}/{entry}" if rel_dir else entry
        path = os.path.join(tree.root, name)
        if name in exclude:
            continue
        try:
            lst = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            raise VerificationError(path, "storage", _os_reason(e)) from None
        mode = lst.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(entry, dir_fd=dir_fd)
            resolved = posixpath.normpath(posixpath.join(rel_dir, target))
            if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
                raise VerificationError(path, "storage", f"a symlink to {target!r}, outside the model directory")
            tree.symlinks[name] = resolved
        elif stat.S_ISDIR(mode):
            try:
                fd = os.open(entry, _O_DIR, dir_fd=dir_fd)
            except OSError as e:
                raise VerificationError(path, "storage", _os_reason(e)) from None
            try:
                _opened_as_checked(path, fd, lst, strict)
                _walk(tree, fd, name, exclude, strict)
            finally:
                os.close(fd)
        elif stat.S_ISREG(mode):
            try:
                fd = os.open(entry, _O_FILE, dir_fd=dir_fd)
            except OSError as e:
                raise VerificationError(path, "storage", _os_reason(e)) from None
            try:
                _add_file(tree, name, path, fd, lst, strict)
            except BaseException:
                os.close(fd)
                raise
        else:
            # Never opened: opening a device or FIFO can block or have effects.
            raise VerificationError(path, "storage", f"{_kind(mode)}, not a regular file")


def _check_hardlinks(tree: Tree, strict: bool, store_links: bool = False) -> None:
    """A file with more links than we found inside can be changed from outside."""
    if not strict:
        return
    inside: dict[tuple[int, int], int] = {}
    for f in tree.files.values():
        inside[f.dev_ino] = inside.get(f.dev_ino, 0) + 1
    for f in tree.files.values():
        st = os.fstat(f.fd)
        nlink = st.st_nlink
        if store_links and not st.st_mode & 0o222:
            continue  # a read-only store blob (owner checked on open): no link can change it
        if nlink > inside[f.dev_ino]:
            raise VerificationError(f.path, "storage", f"has {nlink} hard links, {nlink - inside[f.dev_ino]} of them outside the model directory")


def resolve_symlinks(tree: Tree, allow: bool) -> None:
    """Turns each allowed in-directory symlink into a file entry sharing the
    target's content (a dup of its fd), as model_signing hashes them."""
    for name, target in sorted(tree.symlinks.items()):
        path = os.path.join(tree.root, name)
        if not allow:
            raise VerificationError(path, "storage", "a symlink, and the signature's serialization does not allow symlinks")
        if target not in tree.files:
            raise VerificationError(path, "storage", f"a symlink to {target!r}, which is not a regular model file")
        t = tree.files[target]
        tree.files[name] = OpenFile(name, path, os.dup(t.fd), t.size, t.dev_ino)
    tree.symlinks.clear()
