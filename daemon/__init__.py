"""The privileged supervisor: the root service that verifies, spawns and proxies.

| module | what it holds |
|---|---|
| main.py | `sealboxd`: start-up, signals, shutdown |
| config.py | the TOML config (server, workers, trust policy, models), checked strictly |
| preflight.py | start-up checks that every required sandbox layer is available |
| supervisor.py | each model's state machine: verify, launch, restart, unload; the server's narrow interface |
| worker_process.py | one worker process: spawner thread, the channel to it, exit and death reasons |
| server.py | the public gRPC API (Open Inference Protocol, health, reflection) |
| audit.py | the audit log: one JSON line per decision |

Model verification itself is the trust library's (sealbox.trust); the daemon never
imports worker code.
"""
