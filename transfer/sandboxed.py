"""The root side of the fetch helper: a Transport whose network client runs in its own sandbox.

The root process imports no HTTP, TLS or SSH client: it starts sealbox.transfer.helper through
sandbox.launcher.launch_helper (SandboxProfile.for_fetch_helper), writes requests to its stdin and
reads only bounded frames (transfer/frames.py) from its stdout; the bytes go to the fetch pipeline,
which hashes, bounds and stores them. A helper that breaks the protocol, or is abandoned mid-file
(a size cut), is killed; the next request starts a new one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

from ..sandbox.launcher import SandboxUnavailable, launch_helper, make_socket_dir
from ..sandbox.profile import SandboxProfile
from .fetch import Interrupted, Refused
from .frames import FrameError, read_frame, text

HELPER = "sealbox.transfer.helper"


class SandboxedTransport:
    def __init__(self, location: str, allowed: tuple[str, ...], profile: SandboxProfile, run_dir: str,
                 ca_bundle: str | None = None, connect_timeout: float = 10.0, read_timeout: float = 30.0,
                 ssh_key: str | None = None, known_hosts: str | None = None):
        def text(path):   # read by root; the helper gets the text (it sees no file of the operator's)
            if path is None:
                return None
            with open(path, encoding="ascii") as f:
                return f.read(1 << 20)
        self.spec = json.dumps({"location": location, "allowed": list(allowed), "ca_pem": text(ca_bundle),
                                "ssh_key": text(ssh_key), "known_hosts": text(known_hosts),
                                "connect_timeout": connect_timeout, "read_timeout": read_timeout,
                                "landlock": profile.landlock,
                                "read_only": [*profile.runtime_paths, *profile.extra_ro_paths, "/dev/urandom"]})
        self.profile = profile
        self.run_dir = run_dir
        self.peer: str | None = None
        self.helper = None
        self.parent: str | None = None

    def _start(self):
        if self.helper is None:
            os.makedirs(self.run_dir, mode=0o711, exist_ok=True)
            self.parent = tempfile.mkdtemp(prefix="fetch-", dir=self.run_dir)
            os.chmod(self.parent, 0o711)
            try:
                # Bound, unused (bwrap_args wants one); its unique name also names the helper's cgroup.
                socket_dir = make_socket_dir(self.parent, os.path.basename(self.parent), self.profile)
                self.helper = launch_helper(self.profile, socket_dir, HELPER, "stdin")
            except (SandboxUnavailable, OSError, subprocess.SubprocessError) as exc:
                shutil.rmtree(self.parent, ignore_errors=True)
                self.parent = None
                raise Refused(f"the fetch helper's sandbox is unavailable: {exc}") from None
            try:   # the spec on stdin, not argv: it may hold an SSH private key
                self.helper.proc.stdin.write(self.spec.encode() + b"\n")
            except OSError:
                self._kill()
                raise Interrupted("the fetch helper died at start") from None
        return self.helper

    def _request(self, **req) -> None:
        helper = self._start()
        try:
            helper.proc.stdin.write(json.dumps(req).encode() + b"\n")
        except OSError:
            self._kill()
            raise Interrupted("the fetch helper died") from None

    def _frames(self) -> Iterator[tuple[bytes, bytes]]:
        stdout = self.helper.proc.stdout
        while True:
            try:
                kind, payload = read_frame(stdout)
            except FrameError as e:
                reason = self._kill()
                raise Interrupted(f"{e}{': ' + reason if reason else ''}") from None
            if kind == b"E":
                if payload:
                    self.peer = text(payload)
                return
            if kind == b"I":
                raise Interrupted(text(payload[1:]), restart=payload[:1] == b"\x01")
            if kind == b"R":
                raise Refused(text(payload))
            yield kind, payload

    def metadata(self, name: str, limit: int) -> bytes | None:
        self._request(op="metadata", name=name, limit=limit)
        chunks, total = [], 0
        for kind, payload in self._frames():
            if kind == b"A":
                chunks = None
                continue
            total += len(payload)
            if chunks is None or total > limit:
                self._kill()
                raise Refused(f"{name}: the fetch helper sent more than the {limit} bytes asked for")
            chunks.append(payload)
        return b"".join(chunks) if chunks is not None else None

    def stream(self, name: str, offset: int) -> Iterator[bytes]:
        self._request(op="stream", name=name, offset=offset)
        done = False
        try:
            for kind, payload in self._frames():
                if kind != b"D":
                    self._kill()
                    raise Interrupted(f"the fetch helper sent a {kind.decode()} frame inside a file")
                yield payload
            done = True
        finally:
            if not done:
                self._kill()  # abandoned mid-file (or failed): its pipe holds the rest

    def _kill(self) -> str:
        """Stops the helper; returns the tail of what it wrote on stderr (its reason), bounded."""
        helper, self.helper = self.helper, None
        reason = ""
        if helper is not None:
            helper.kill()
            try:
                err = helper.proc.stderr.read(1 << 16) if helper.proc.stderr else b""
                reason = err.decode("utf-8", "replace").strip().splitlines()[-1][:300] if err.strip() else ""
            except (OSError, IndexError):
                pass
            for pipe in (helper.proc.stdin, helper.proc.stdout, helper.proc.stderr):
                if pipe:
                    pipe.close()
            helper.cleanup()
        if self.parent:
            shutil.rmtree(self.parent, ignore_errors=True)
            self.parent = None
        return reason

    def close(self) -> None:
        if self.helper is not None:
            try:
                self.helper.proc.stdin.close()
                self.helper.proc.wait(5)
            except Exception:
                pass
        self._kill()
