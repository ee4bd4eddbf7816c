"""SFTP transport (helper side, paramiko): key authentication only, the host key pinned.

The server's host key must be in the known_hosts text the operator configured (entries for a
non-default port read `[HOST]:PORT`); an unknown or changed key is refused before authenticating,
never learned (no trust on first use). Authentication is public key only: no password, no
keyboard-interactive, no agent, no key files looked for. The private key comes from the root as text.
"""
from __future__ import annotations

import io
import posixpath
import socket
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import paramiko

from .fetch import Interrupted, Refused

CHUNK = 1 << 20


def _load_key(text: str) -> paramiko.PKey:
    for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return kind.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise Refused("the SSH private key is not an unencrypted Ed25519, ECDSA or RSA key")


class SftpTransport:
    def __init__(self, location: str, ssh_key: str, known_hosts: str, connect_timeout: float = 10.0,
                 read_timeout: float = 30.0):
        parts = urlsplit(location)
        self.user, self.host, self.port = unquote(parts.username or ""), parts.hostname, parts.port or 22
        self.dir = parts.path
        self.key = _load_key(ssh_key)
        self.known = paramiko.HostKeys()
        for n, line in enumerate(known_hosts.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, n)
            if entry is not None and entry.key is not None:
                for host in entry.hostnames:
                    self.known.add(host, entry.key.get_name(), entry.key)
        self.timeouts = (connect_timeout, read_timeout)
        self.transport: paramiko.Transport | None = None
        self.sftp: paramiko.SFTPClient | None = None
        self.peer: str | None = None

    def _connect(self) -> paramiko.SFTPClient:
        if self.sftp is not None and self.transport is not None and self.transport.is_active():
            return self.sftp
        self.close()
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeouts[0])
        except OSError as e:
            raise Interrupted(f"sftp://{self.host}:{self.port}: {e.strerror or e}") from None
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=self.timeouts[0])
            key = t.get_remote_server_key()
            known = self.known.lookup(name)
            if not known or known.get(key.get_name()) != key:
                raise Refused(f"sftp://{self.host}:{self.port}: host key {key.get_name()} "
                              f"SHA256:{_fingerprint(key)} is not the one known_hosts pins for {name}")
            t.auth_publickey(self.user, self.key)   # public key only: nothing else is ever tried
            sftp = paramiko.SFTPClient.from_transport(t)
            sftp.get_channel().settimeout(self.timeouts[1])
        except paramiko.AuthenticationException:
            t.close()
            raise Refused(f"sftp://{self.user}@{self.host}:{self.port}: public key authentication refused") from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            t.close()
            raise Interrupted(f"sftp://{self.host}:{self.port}: {e}") from None
        except Refused:
            t.close()
            raise
        self.transport, self.sftp = t, sftp
        addr = sock.getpeername()
        self.peer = f"{name} ({addr[0]}:{addr[1]}) host key {key.get_name()} SHA256:{_fingerprint(key)}"
        return sftp

    def close(self) -> None:
        if self.sftp is not None:
            self.sftp.close()
        if self.transport is not None:
            self.transport.close()
        self.sftp = self.transport = None

    def _path(self, name: str) -> str:
        return posixpath.join(self.dir, name)

    def metadata(self, name: str, limit: int) -> bytes | None:
        sftp = self._connect()
        try:
            with sftp.open(self._path(name), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise Interrupted(f"{self._path(name)}: {e}") from None
        if len(data) > limit:
            raise Refused(f"{self._path(name)}: more than the {limit} bytes allowed for metadata")
        return data

    def stream(self, name: str, offset: int) -> Iterator[bytes]:
        sftp = self._connect()
        try:
            f = sftp.open(self._path(name), "rb")
        except FileNotFoundError:
            raise Refused(f"{self._path(name)}: no such file") from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise Interrupted(f"{self._path(name)}: {e}") from None
        try:
            f.seek(offset)
            while True:
                try:
                    chunk = f.read(CHUNK)
                except (OSError, paramiko.SSHException, EOFError, socket.timeout) as e:
                    self.close()
                    raise Interrupted(f"{self._path(name)}: {e}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            try:
                f.close()
            except Exception:
                pass


def _fingerprint(key: paramiko.PKey) -> str:
    import base64
    import hashlib
    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
