"""The fetch helper: the network clients, run in their own sandbox (`python -m sealbox.transfer.helper`).

Started by the root supervisor through sandbox.launcher.launch_helper (its own uid, the host's
network, bubblewrap, seccomp's "fetch" allowlist, cgroup, rlimits); first it applies Landlock to
itself (the runtime and the lookup/CA files read-only, nothing writable). It holds no secret and
writes no file: it reads requests on stdin and streams the answers as frames (transfer/frames.py)
to stdout, where the root hashes, bounds and stores them. The first stdin line is the spec, JSON:
location, allowed URL prefixes, a pinned CA bundle's PEM text (or null: the system CAs), for SFTP the
private key and known_hosts text, timeouts, the read-only paths.
"""
from __future__ import annotations

import json
import sys


def client_for(location: str, allowed: tuple[str, ...], ca_bundle: str | None, connect_timeout: float,
               read_timeout: float, cadata: str | None = None, ssh_key: str | None = None,
               known_hosts: str | None = None):
    """The network client for a location (checked by fetch.check_location): HTTPS, an OCI registry, SFTP."""
    if location.startswith("sftp://"):
        from .fetch import Refused
        from .sftp import SftpTransport
        if not ssh_key or not known_hosts:
            raise Refused(f"{location}: sftp needs an SSH private key and a known_hosts file")
        return SftpTransport(location, ssh_key, known_hosts, connect_timeout, read_timeout)
    if location.startswith("oci://"):
        from .oci import OciTransport
        return OciTransport(location, allowed, ca_bundle, connect_timeout, read_timeout, cadata)
    from .https import HttpsTransport
    return HttpsTransport(location, allowed, ca_bundle, connect_timeout, read_timeout, cadata)


def main() -> int:
    # The spec is the first line on stdin, never argv: /proc/PID/cmdline is readable by every local
    # user, and the spec may carry an SSH private key.
    spec = json.loads(sys.stdin.buffer.readline())
    if spec.get("landlock"):
        from ..sandbox.landlock import restrict_self
        restrict_self(read_only=spec["read_only"], read_write=[], deny_tcp=False)
    out = sys.stdout.buffer
    from .frames import MAX_DATA, frame
    from .fetch import Interrupted, Refused
    # A pinned CA bundle comes as PEM text: the helper sees no file of the operator's.
    try:
        transport = client_for(spec["location"], tuple(spec["allowed"]), None, spec["connect_timeout"],
                               spec["read_timeout"], cadata=spec.get("ca_pem"), ssh_key=spec.get("ssh_key"),
                               known_hosts=spec.get("known_hosts"))
    except Refused as e:
        for _ in sys.stdin.buffer:   # every request gets the refusal
            out.write(frame(b"R", str(e).encode()[:4096]))
            out.flush()
        return 0
    for line in sys.stdin.buffer:
        req = json.loads(line)
        try:
            if req["op"] == "metadata":
                data = transport.metadata(req["name"], int(req["limit"]))
                if data is None:
                    out.write(frame(b"A"))
                else:
                    for i in range(0, len(data), MAX_DATA):
                        out.write(frame(b"D", data[i:i + MAX_DATA]))
            else:
                for chunk in transport.stream(req["name"], int(req["offset"])):
                    for i in range(0, len(chunk), MAX_DATA):
                        out.write(frame(b"D", chunk[i:i + MAX_DATA]))
            out.write(frame(b"E", (transport.peer or "").encode()[:4096]))
        except Interrupted as e:
            out.write(frame(b"I", (b"\x01" if e.restart else b"\x00") + str(e).encode()[:4000]))
        except Refused as e:
            out.write(frame(b"R", str(e).encode()[:4096]))
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
