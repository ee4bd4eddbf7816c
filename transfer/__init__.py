"""sealbox.transfer: secure transfer of signed models into a verified content-addressed store.

The signed manifest drives every download: the signature is fetched and verified
first (by sealbox.trust, the one place trust is decided), then exactly the files it
names are requested, hashed while they stream and stored under their SHA-256; a
fetched model is then verified from the store exactly like a local directory.

| module | what it holds |
|---|---|
| `store.py` | the content-addressed store under state_dir: blobs (temp file, fsync, rename), per-version views of hard links, the in-use locks, `ls` and `gc` |
| `fetch.py` | the pipeline: `check_location` (scheme and policy sources, before any connection), `fetch_model` (signature first, then the signed files only, size cut, digests, resume), `store_policy` |
| `https.py` | `HttpsTransport` (urllib3, extra `[fetch]`): verified TLS (system CAs or a pinned bundle), redirects only to trusted https:// prefixes, timeouts, Range resume |
| `oci.py` | `OciTransport`: OCI artifacts over the distribution API (layers by ORAS title, the signature as a layer or through the referrers fallback tag) |
| `sftp.py` | `SftpTransport` (paramiko): public-key authentication only, the host key pinned from known_hosts text |
| `helper.py` | the fetch helper's main (`python -m sealbox.transfer.helper SPEC`), run sandboxed: Landlock on itself, then `HttpsTransport`, answering in frames |
| `frames.py` | the helper's pipe protocol: requests in, bounded frames out (data, end, absent, interrupted, refused) |
| `sandboxed.py` | `SandboxedTransport`: the root side; starts the helper (sandbox.launcher.launch_helper), reads only frames |

The HTTP and SSH clients are optional dependencies (extra `fetch`); the root daemon imports only `store.py`,
`fetch.py`, `frames.py` and `sandboxed.py` (tests/transfer checks no network client is imported).
"""
