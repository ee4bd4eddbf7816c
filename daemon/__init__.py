"""The privileged supervisor: the root service that verifies, spawns and proxies.

| module | what it holds |
|---|---|
| main.py | `sealboxd`: start-up, signals, shutdown |
| config.py | the TOML config (server, workers, trust policy, models), checked strictly |
| preflight.py | start-up checks that every required sandbox layer is available; --check-config's checks; clean-up of a dead daemon's worker directories and cgroups |
| fetching.py | remote models (`source = "https://..."`): fetched into the store through the sandboxed helper, one per model, bounded, audited |
| supervisor.py | each model's state machine: verify, launch its `instances` (least-loaded first), restart each, unload, hand-over to a new version, config reload (SIGHUP), readiness; the server's narrow interface |
| phases.py | where a load's time goes: verify, hashing, spawn, READY, the worker's own account; for the `model_load` event and log line |
| worker_process.py | one worker process: spawner thread, Describe at load, its hop, exit and death reasons |
| warm_pool.py | pre-started, confined workers per worker profile, each handed one model's fds (LOAD), refilled in the background |
| server.py | the public gRPC API on grpc.aio (Open Inference Protocol, health, reflection): routing, `serve()` |
| listeners.py | one grpc.aio server per listener (Unix sockets, TCP, mutual TLS), binding all-or-nothing, the access check |
| roles.py | roles by protocol group, the method -> role table (default deny), the caller as the transport proved it |
| admission.py | bounded cost: lanes, caps on calls, streams and bytes, per-model queues, `tune_malloc` |
| errors.py | every status a client sees: fixed texts, worker statuses mapped and truncated |
| provenance.py | which verified model answered (manifest digest, version, signer), stamped on every answer |
| shared_memory.py | Triton's system shared memory: regions per listener, owners by uid, pread/pwrite only; each worker's reused input and output arenas |
| worker_hop.py | the supervisor's side of the hop (proto/hop.py) on the event loop: pipelined calls, streams, CANCEL, timeouts from the take; blocking Describe |
| audit.py | the audit log: one JSON line per decision, in its own file; reopened on SIGHUP |
| call_audit.py | the caller's identity on every audit event of a call; refusals rate-limited |
| logs.py | operational logging: ISO-8601 timestamps, level, text or JSON (--log-format) |
| metrics.py | Prometheus metrics (own registry) and the /metrics listener ([server] metrics) |
| notify.py | sd_notify for systemd: READY, RELOADING, STOPPING, WATCHDOG |

Model verification itself is the trust library's (sealbox.trust); the daemon never
imports worker code.
"""
