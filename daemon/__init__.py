"""The privileged supervisor: the root service that verifies, spawns and proxies.

| module | what it holds |
|---|---|
| main.py | `sealboxd`: start-up, signals, shutdown |
| config.py | the TOML config (server, workers, trust policy, models), checked strictly |
| preflight.py | start-up checks that every required sandbox layer is available |
| supervisor.py | each model's state machine: verify, launch, restart, unload; the server's narrow interface |
| worker_process.py | one worker process: spawner thread, the channel to it, exit and death reasons |
| server.py | the public gRPC API (Open Inference Protocol, health, reflection) |
| audit.py | the audit log: one JSON line per decision, in its own file; reopened on SIGHUP |
| logs.py | operational logging: ISO-8601 timestamps, level, text or JSON (--log-format) |
| metrics.py | Prometheus metrics (own registry) and the /metrics listener ([server] metrics) |
| notify.py | sd_notify for systemd: READY, RELOADING, STOPPING, WATCHDOG |

Model verification itself is the trust library's (sealbox.trust); the daemon never
imports worker code.
"""
