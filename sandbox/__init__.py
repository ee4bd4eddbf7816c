"""Worker confinement: one sandbox profile value, rendered into every layer.

| module | what it holds |
|---|---|
| profile.py | `SandboxProfile` and `SandboxProfile.for_model`: the one place a worker's confinement is decided; `for_fetch_helper`: the fetch helper's (sealbox.transfer) |
| launcher.py | renders a profile into bubblewrap's command line and the worker's `WorkerSpec`; starts a worker, or a helper on pipes (`launch_helper`) |
| seccomp.py | the per-engine syscall allowlists (two stages; `fetch`: the fetch helper's, with inet sockets) and loading a filter from an fd |
| landlock.py | the worker's filesystem/network/scope restrictions, applied by the worker to itself |
| cgroups.py | one cgroup per worker (memory, pids; v2 or v1), OOM detection, cgroup.kill, removal of stale groups |
| limits.py | rlimits and the environment every worker runs with |
| hostcheck.py | which layers this host can apply (`sealbox sandbox check`, the daemon's preflight) |
| macos.py | the Seatbelt (sandbox-exec) profile text for macOS workers |
| tools.py | operator tools run in exactly a worker's sandbox (`sealbox scan`, `sealbox sandbox run-python`) |

The confinement order, across both processes (each step before any model byte is read):

In the supervisor (root), `launcher.launch`:
1. Build the engine's seccomp programs with libseccomp: stage 1 (default-deny allowlist) and
   stage 2 (exec and the confinement calls banned), each in a sealed memfd.
2. Create the worker's cgroup with its memory and pids limits.
3. Fork. In the child, still root: join the cgroup (so nothing the worker forks escapes it),
   unshare a fresh network namespace (only a downed `lo`), set rlimits (nofile, fsize, core 0),
   drop supplementary groups, then gid, then uid to the worker user.
4. Exec bubblewrap as the worker user: new user/ipc/pid/uts/cgroup namespaces, no nested user
   namespaces, die-with-parent, new session, cleared environment, all capabilities dropped, a
   read-only view of the runtime, a size-limited tmpfs /tmp, the socket directory as the only
   writable bind; bubblewrap installs seccomp stage 1 and execs the worker's Python.
In the worker, `worker/main.py`, while it has one thread:
5. Landlock: read-only runtime, writable /tmp and /dev/null, only its socket in the socket dir,
   TCP denied, signals and abstract sockets scoped.
6. Seccomp stage 2 from the inherited fd: exec and the confinement calls now kill.
7. Preload Debian's OpenBLAS (it starts threads, so only after Landlock).
8. Only now the engine opens the sealed memfds of the verified bytes.

A warm-pool worker (daemon/warm_pool.py, [workers] warm_pool) runs steps 1-5 and 7 before its model
is known (step 2 with the [workers] limits), imports its engine, and waits for one LOAD record with
the model's memfds. Then, before any model byte is read: the supervisor writes the model's memory
and pids limits into the cgroup (before sending the LOAD), and the worker applies step 6 on receipt
(seccomp's TSYNC puts it on every thread, OpenBLAS's included).
"""
