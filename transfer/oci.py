"""OCI transport (helper side): a model as an OCI artifact, its files the layers, named by the ORAS
title annotation; the signature a layer titled like the policy's signature file, or a detached
artifact found through the referrers fallback tag `sha256-<manifest hex>`.

The OCI distribution API is spoken over HttpsTransport (the same TLS, redirect, timeout and Range
rules): GET /v2/REPO/manifests/REF and /v2/REPO/blobs/DIGEST. A manifest fetched by digest is
checked against it here; blob contents are never trusted here: the root hashes every byte against
the signed manifest (OCI layer digests and sizes are not what sealbox trusts; the oras SDK's pull
does not check them either). Tokens and credentials are not supported: anonymous pulls only.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator

from .fetch import OCI_REFERENCE, Refused
from .https import HttpsTransport

MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json")
MAX_MANIFEST = 4 << 20
TITLE = "org.opencontainers.image.title"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def parse_reference(location: str) -> tuple[str, str, str]:
    """oci://HOST[:PORT]/REPO:TAG or @sha256:HEX -> (host, repo, tag or digest)."""
    m = OCI_REFERENCE.match(location)
    if not m:
        raise Refused(f"{location}: not oci://REGISTRY/REPOSITORY:TAG or oci://REGISTRY/REPOSITORY@sha256:DIGEST")
    return m.group(1), m.group(2), m.group(3) or m.group(4)


class OciTransport:
    def __init__(self, location: str, allowed: tuple[str, ...], ca_bundle: str | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 30.0, cadata: str | None = None):
        self.host, self.repo, self.ref = parse_reference(location)
        # Redirects (blob storage) are followed only within this registry's own https origin.
        base = f"https://{self.host}/v2/{self.repo}/"
        self.http = HttpsTransport(base, (f"https://{self.host}/",), ca_bundle, connect_timeout, read_timeout, cadata)
        self.files: dict[str, tuple[str, int]] | None = None   # title -> (digest, size)
        self.manifest_digest: str | None = None
        self.peer: str | None = None

    def close(self) -> None:
        self.http.close()

    def _get_manifest(self, ref: str) -> tuple[dict, str]:
        data = self.http.metadata(f"manifests/{ref}", MAX_MANIFEST, {"Accept": ", ".join(MANIFEST_TYPES)})
        if data is None:
            raise Refused(f"oci://{self.host}/{self.repo}: no manifest {ref}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if _DIGEST.match(ref) and digest != ref:
            raise Refused(f"oci://{self.host}/{self.repo}@{ref}: the registry's manifest has digest {digest}")
        try:
            doc = json.loads(data)
        except ValueError:
            raise Refused(f"oci://{self.host}/{self.repo}: manifest {ref} is not JSON") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
            raise Refused(f"oci://{self.host}/{self.repo}: manifest {ref} is not an OCI manifest (schemaVersion 2)")
        return doc, digest

    @staticmethod
    def _titles(doc: dict, where: str) -> dict[str, tuple[str, int]]:
        files = {}
        for layer in doc.get("layers") or ():
            title = (layer.get("annotations") or {}).get(TITLE) if isinstance(layer, dict) else None
            digest, size = (layer.get("digest"), layer.get("size")) if isinstance(layer, dict) else (None, None)
            if not isinstance(title, str) or not _DIGEST.match(str(digest)) or not isinstance(size, int):
                raise Refused(f"{where}: a layer without a title, a sha256 digest or a size")
            if title in files:
                raise Refused(f"{where}: two layers titled {title!r}")
            files[title] = (digest, size)
        return files

    def _resolve(self) -> dict[str, tuple[str, int]]:
        if self.files is None:
            doc, self.manifest_digest = self._get_manifest(self.ref)
            if doc.get("mediaType", MANIFEST_TYPES[0]) != MANIFEST_TYPES[0]:
                raise Refused(f"oci://{self.host}/{self.repo}:{self.ref}: an index, not an artifact manifest")
            self.files = self._titles(doc, f"oci://{self.host}/{self.repo}@{self.manifest_digest}")
            self.peer = f"{self.http.peer}; manifest {self.manifest_digest}"
        return self.files

    def _detached(self, name: str, limit: int) -> bytes | None:
        """A signature attached as a referrer, found through the fallback tag (registries without the
        referrers API, such as Debian's registry 2.8): an index of artifacts whose subject is ours."""
        tag = self.manifest_digest.replace(":", "-")
        try:
            index, _ = self._get_manifest(tag)
        except Refused:
            return None
        for desc in index.get("manifests") or ():
            if not isinstance(desc, dict) or not _DIGEST.match(str(desc.get("digest"))):
                continue
            doc, _ = self._get_manifest(desc["digest"])
            if (doc.get("subject") or {}).get("digest") != self.manifest_digest:
                continue
            layer = self._titles(doc, f"oci://{self.host}/{self.repo}@{desc['digest']}").get(name)
            if layer is not None:
                return self._blob(layer, limit)
        return None

    def _blob(self, layer: tuple[str, int], limit: int) -> bytes:
        digest, size = layer
        if size > limit:
            raise Refused(f"blob {digest}: {size} bytes, more than the {limit} allowed for metadata")
        data = self.http.metadata(f"blobs/{digest}", limit)
        if data is None:
            raise Refused(f"oci://{self.host}/{self.repo}: blob {digest} is missing")
        return data

    def metadata(self, name: str, limit: int) -> bytes | None:
        files = self._resolve()
        if name in files:
            return self._blob(files[name], limit)
        return self._detached(name, limit)

    def stream(self, name: str, offset: int) -> Iterator[bytes]:
        files = self._resolve()
        if name not in files:
            raise Refused(f"oci://{self.host}/{self.repo}@{self.manifest_digest}: no layer titled {name!r}")
        return self.http.stream(f"blobs/{files[name][0]}", offset)
