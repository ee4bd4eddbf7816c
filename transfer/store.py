"""The content-addressed store: verified bytes kept under their SHA-256, and per-version model views.

Layout under the daemon's state_dir (all root-owned, directories 0755, blobs 0444):

    store/sha256/<hex>             one blob per distinct content, stored once
    store/tmp/<random>             a blob being written (flock'ed by its writer)
    store/views/<model>/<key>/     one model version: its signed files as hard links to blobs,
                                   beside its signature (and release statement)
    store/locks/<model>@<key>      held (flock, shared) while a daemon serves from that view

A blob is written to a temporary file, fsynced, made read-only and only then
linked under its digest name (and the directory fsynced), so a crash leaves
at most a temporary file, never a partial blob under a digest name. The store
is a cache: trust comes from verifying a view exactly as a local model
directory (trust.verify_model with store_links=True, which accepts the
store's own hard links on read-only root-owned files).
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass

HEX = re.compile(r"[0-9a-f]{64}")
KEY = re.compile(r"[0-9a-f]{32}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(f"{path}: the store's directories must be directories owned by uid {os.geteuid()}, "
                      f"not group- or world-writable")


@dataclass
class BlobInfo:
    digest: str   # hex sha256
    size: int
    links: int    # views referencing it (hard links beyond the blob itself)


class BlobWriter:
    """One blob being written: write(), then commit() -> hex digest, or abort()."""

    def __init__(self, store: "Store"):
        self.store = store
        self.path = os.path.join(store.tmp, secrets.token_hex(16))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # gc leaves a locked temporary file alone
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.sha256.update(data)
        self.size += len(data)

    def truncate(self, size: int) -> None:
        """Back to `size` bytes (a restart from the beginning: size 0)."""
        if size != 0:
            raise ValueError("only a restart from the beginning is supported")
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.sha256, self.size = hashlib.sha256(), 0

    def commit(self) -> str:
        digest = self.sha256.hexdigest()
        os.fsync(self.fd)
        os.fchmod(self.fd, 0o444)
        final = self.store.blob_path(digest)
        try:
            os.link(self.path, final)  # never replaces: an existing blob of this digest is the same content
        except FileExistsError:
            pass
        _fsync_dir(self.store.blobs)
        self.abort()
        return digest

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class Store:
    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "store")
        self.blobs = os.path.join(self.root, "sha256")
        self.tmp = os.path.join(self.root, "tmp")
        self.views = os.path.join(self.root, "views")
        self.locks = os.path.join(self.root, "locks")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)  # the daemon's state_dir (versions.json wants 0700)
        for d in (self.root, self.blobs, self.tmp, self.views, self.locks):
            _mkdir(d)

    def blob_path(self, digest: str) -> str:
        if not HEX.fullmatch(digest):
            raise ValueError(f"not a hex SHA-256: {digest!r}")
        return os.path.join(self.blobs, digest)

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def view_path(self, model: str, key: str) -> str:
        return os.path.join(self.views, model, key)

    def make_view(self, model: str, files: dict[str, str], metadata: dict[str, bytes]) -> str:
        """A directory of hard links (signed name -> blob digest) and metadata files (name -> bytes).

        Named by a key over everything in it, so an existing view with that key is this view."""
        key_hash = hashlib.sha256()
        for name in sorted(files):
            key_hash.update(f"f\0{name}\0{files[name]}\0".encode())
        for name in sorted(metadata):
            key_hash.update(f"m\0{name}\0".encode() + hashlib.sha256(metadata[name]).digest())
        key = key_hash.hexdigest()[:32]
        final = self.view_path(model, key)
        if os.path.isdir(final):
            os.utime(final)  # the newest view of the model, for gc
            return final
        _mkdir(os.path.join(self.views, model))
        building = os.path.join(self.tmp, f"view-{secrets.token_hex(8)}")
        os.mkdir(building, 0o755)
        try:
            for name, digest in files.items():
                target = os.path.join(building, name)
                _mkdir(os.path.dirname(target))
                os.link(self.blob_path(digest), target)
            for name, data in metadata.items():
                target = os.path.join(building, name)
                _mkdir(os.path.dirname(target))
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.rename(building, final)
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
            if os.path.isdir(final):  # built by someone else meanwhile: the same content
                return final
            raise
        _fsync_dir(os.path.dirname(final))
        return final

    def hold(self, model: str, view: str) -> int:
        """Marks a view as in use until the returned fd is closed (gc skips it)."""
        key = os.path.basename(view)
        fd = os.open(os.path.join(self.locks, f"{model}@{key}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def ls(self) -> tuple[list[BlobInfo], dict[str, list[str]]]:
        blobs = []
        for name in sorted(os.listdir(self.blobs)):
            st = os.lstat(os.path.join(self.blobs, name))
            if HEX.fullmatch(name) and stat.S_ISREG(st.st_mode):
                blobs.append(BlobInfo(name, st.st_size, st.st_nlink - 1))
        views = {m: sorted(os.listdir(os.path.join(self.views, m))) for m in sorted(os.listdir(self.views))}
        return blobs, views

    def _in_use(self, model: str, key: str) -> bool:
        path = os.path.join(self.locks, f"{model}@{key}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def gc(self) -> tuple[list[str], list[str]]:
        """Removes views neither in use nor their model's newest, then blobs no view links, then
        abandoned temporary files. Returns (views removed as model/key, blob digests removed)."""
        removed_views, removed_blobs = [], []
        for model in sorted(os.listdir(self.views)):
            mdir = os.path.join(self.views, model)
            keys = sorted(os.listdir(mdir), key=lambda k: os.lstat(os.path.join(mdir, k)).st_mtime_ns)
            for key in keys[:-1]:
                if not self._in_use(model, key):
                    shutil.rmtree(os.path.join(mdir, key))
                    removed_views.append(f"{model}/{key}")
                    try:
                        os.unlink(os.path.join(self.locks, f"{model}@{key}"))
                    except FileNotFoundError:
                        pass
        for blob in self.ls()[0]:
            if blob.links == 0:
                os.unlink(self.blob_path(blob.digest))
                removed_blobs.append(blob.digest)
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if os.path.isdir(path) and not os.path.islink(path):
                continue  # a view being built
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(path)  # its writer died
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
        return removed_views, removed_blobs
