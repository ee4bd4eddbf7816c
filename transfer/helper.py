"""The fetch helper: the HTTPS client, run in its own sandbox (`python -m sealbox.transfer.helper SPEC`).

Started by the root supervisor through sandbox.launcher.launch_helper (its own uid, the host's
network, bubblewrap, seccomp's "fetch" allowlist, cgroup, rlimits); first it applies Landlock to
itself (the runtime and the lookup/CA files read-only, nothing writable). It holds no secret and
writes no file: it reads requests on stdin and streams the answers as frames (transfer/frames.py)
to stdout, where the root hashes, bounds and stores them. SPEC is JSON: location, allowed URL
prefixes, a pinned CA bundle's PEM text (or null: the system CAs), timeouts, the read-only paths.
"""
from __future__ import annotations

import json
import sys


def client_for(location: str, allowed: tuple[str, ...], ca_bundle: str | None, connect_timeout: float,
               read_timeout: float, cadata: str | None = None):
    """The network client for a location (checked by fetch.check_location): HTTPS or an OCI registry."""
    if location.startswith("oci://"):
        from .oci import OciTransport
        return OciTransport(location, allowed, ca_bundle, connect_timeout, read_timeout, cadata)
    from .https import HttpsTransport
    return HttpsTransport(location, allowed, ca_bundle, connect_timeout, read_timeout, cadata)


def main() -> int:
    spec = json.loads(sys.argv[1])
    if spec.get("landlock"):
        from ..sandbox.landlock import restrict_self
        restrict_self(read_only=spec["read_only"], read_write=[], deny_tcp=False)
    out = sys.stdout.buffer
    from .frames import MAX_DATA, frame
    from .fetch import Interrupted, Refused
    # A pinned CA bundle comes as PEM text: the helper sees no file of the operator's.
    transport = client_for(spec["location"], tuple(spec["allowed"]), None, spec["connect_timeout"],
                           spec["read_timeout"], cadata=spec.get("ca_pem"))
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
