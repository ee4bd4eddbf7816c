"""`sealbox sandbox check`: what this host offers each sandbox layer, measured, not assumed."""
from __future__ import annotations

import platform
import pwd
import re
import shutil
import subprocess
import sys

from . import cgroups, landlock, seccomp

WORKER_USER = "sealbox-worker"
_CLONE_NEWUSER = 0x10000000
# A child that tries to create a user namespace, as the worker uid would (exit 0: it could).
_TRY_USERNS = ("import ctypes, os, sys\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               f"sys.exit(0 if libc.unshare({_CLONE_NEWUSER}) == 0 else ctypes.get_errno())\n")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _worker_user(name: str) -> dict:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return {"name": name, "exists": False, "uid": None, "gid": None}
    return {"name": name, "exists": True, "uid": entry.pw_uid, "gid": entry.pw_gid}


def _namespaces(user: dict) -> dict:
    """Can an unprivileged uid (the worker's, else nobody) create a user namespace? Tried for real."""
    uid, gid = (user["uid"], user["gid"]) if user["exists"] else (65534, 65534)
    result = {"max_user_namespaces": _read_int("/proc/sys/user/max_user_namespaces"),
              "unprivileged_userns_clone": _read_int("/proc/sys/kernel/unprivileged_userns_clone"),
              "tried_as_uid": uid}
    try:
        child = subprocess.run([sys.executable, "-c", _TRY_USERNS], user=uid, group=gid, extra_groups=[],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/")
        result["user_namespaces"] = child.returncode == 0
        result["detail"] = ("unshare(CLONE_NEWUSER) succeeded" if child.returncode == 0 else
                            f"unshare(CLONE_NEWUSER) failed: exit {child.returncode} "
                            f"{child.stderr.decode(errors='replace').strip()[-200:]}")
    except (OSError, subprocess.SubprocessError) as exc:
        result["user_namespaces"] = False
        result["detail"] = f"could not run a test child as uid {uid}: {exc}"
    return result


def _bubblewrap() -> dict:
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if not path:
        return {"path": None, "version": None}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"bubblewrap (\S+)", out)
        return {"path": path, "version": match.group(1) if match else None}
    except (OSError, subprocess.SubprocessError):
        return {"path": path, "version": None}


def host_report(worker_user: str = WORKER_USER) -> dict:
    """Every layer's state on this host, and which layers a worker would get."""
    user = _worker_user(worker_user)
    namespaces = _namespaces(user)
    ok, detail = seccomp.seccomp_available()
    libseccomp = detail.split(";")[0].removeprefix("libseccomp ") if ok else None
    abi = landlock.abi_version()
    cg = cgroups.cgroup_support()
    bwrap = _bubblewrap()
    layers = {
        "namespaces": bool(bwrap["path"]) and namespaces["user_namespaces"],
        "worker_uid": user["exists"] and user["uid"] != 0,
        "seccomp": ok,
        "landlock": abi >= 6,  # filesystem rules, TCP denial (4) and signal/socket scopes (6)
        "cgroups": cg["usable"],
        "rlimits": True,
    }
    return {
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "namespaces": namespaces,
        "worker_user": user,
        "seccomp": {"available": ok, "detail": detail, "libseccomp": libseccomp},
        "landlock": {"abi": abi},
        "cgroups": cg,
        "bubblewrap": bwrap,
        "layers": layers,
    }


def format_report(report: dict) -> str:
    """Plain text for a terminal: one line per layer, then the verdict."""
    ns, user, sc, cg, bw = (report["namespaces"], report["worker_user"], report["seccomp"],
                            report["cgroups"], report["bubblewrap"])
    p, layers = report["platform"], report["layers"]
    abi = report["landlock"]["abi"]

    def mark(flag: bool) -> str:
        return "ok  " if flag else "MISSING"

    lines = [
        f"host: {p['system']} {p['release']} {p['machine']}",
        f"bubblewrap:  {bw['path'] or 'not found'}" + (f" (version {bw['version']})" if bw["version"] else ""),
        f"namespaces:  user namespaces {'allowed' if ns['user_namespaces'] else 'NOT allowed'} "
        f"(max_user_namespaces={ns['max_user_namespaces']}; tried as uid {ns['tried_as_uid']}: {ns['detail']})",
        f"worker uid:  {user['name']}: " + (f"uid {user['uid']}, gid {user['gid']}" if user["exists"] else
                                            "does not exist (useradd --system --no-create-home sealbox-worker)"),
        f"seccomp:     {sc['detail']}",
        "landlock:    " + (f"ABI {abi}" if abi else "not available"),
        f"cgroups:     {cg['version']}; memory limit via {cg['memory'] or 'nothing'}, "
        f"pids limit via {cg['pids'] or 'nothing'}; memory+swap limit {'yes' if cg['memsw'] else 'no'}; "
        f"cgroup.kill {'yes' if cg['cgroup_kill'] else 'no'}",
        "layers a worker would get:",
    ]
    lines += [f"  {mark(flag)} {name}" for name, flag in layers.items()]
    return "\n".join(lines) + "\n"
