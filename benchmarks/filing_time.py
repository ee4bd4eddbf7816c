"""The daemon as it was when issue 11 was filed, rebuilt from git history, as a same-run baseline.

Issue 11's 64-client goal is "3x today's calls/s with batching", today being the code of its filing:
commit FILING_COMMIT (one instance, no batching, the supervisor<->worker hop still gRPC, the public
server on grpcio's thread pool). FilingTimeDaemon unpacks that commit (`git archive`), installs it into
a copy of the running virtualenv in place of today's sealbox (the worker's sandbox binds that venv, so the
worker runs the old code too), and starts its own `sealbox demo` model with that commit's own code.

    with FilingTimeDaemon() as target:   # "unix:/tmp/.../sealbox.sock", model "demo"
        ...
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

FILING_COMMIT = "6ec484b"
REPO = pathlib.Path(__file__).resolve().parent.parent

# Run by the old venv's Python: that commit's own demo set-up and daemon. Prints the target, then runs
# until its stdin closes.
_LAUNCH = """
import os, subprocess, sys
from sealbox.client.demo import prepare
directory, venv = sys.argv[1], sys.argv[2]
config = prepare(directory)
text = open(config).read().replace("/run/sealbox/demo-workers", "/run/sealbox/filing-time-workers")
open(config, "w").write(text)
daemon = subprocess.Popen([sys.executable, "-m", "sealbox.daemon.main", "--config", config],
                          stderr=open(os.path.join(directory, "stderr"), "w"))
print("target unix:" + directory + "/sealbox.sock", flush=True)
sys.stdin.read()
daemon.terminate()
daemon.wait()
"""


def unavailable() -> str | None:
    """Why the baseline cannot be built here (None when it can): it needs the repository's history."""
    probe = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{FILING_COMMIT}^{{commit}}"],
                           capture_output=True)
    return None if probe.returncode == 0 else f"commit {FILING_COMMIT} is not in this clone's history"


class FilingTimeDaemon:
    def __enter__(self) -> str:
        from tests.support import wait_for
        from sealbox.client import Client
        self.dir = tempfile.mkdtemp(prefix="sealbox-filing-time-")
        os.chmod(self.dir, 0o755)   # the worker uid reaches the venv and the model through it
        self.proc = None
        try:
            src, venv = os.path.join(self.dir, "src"), os.path.join(self.dir, "venv")
            os.makedirs(src)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", FILING_COMMIT], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
            shutil.copytree(sys.prefix, venv, symlinks=True)
            site = os.path.join(venv, os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix))
            for name in os.listdir(site):
                if name == "sealbox" or name.startswith("sealbox-"):
                    shutil.rmtree(os.path.join(site, name))
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site, src],
                           check=True, capture_output=True)
            subprocess.run(["chmod", "-R", "a+rX", self.dir], check=True)
            demo = os.path.join(self.dir, "demo")
            self.proc = subprocess.Popen([os.path.join(venv, "bin", "python"), "-c", _LAUNCH, demo, venv],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=self.dir)
            line = ""
            while not line.startswith("target "):
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the filing-time daemon did not start (see {demo}/stderr)")
            target = line.split(" ", 1)[1].strip()
            with Client(target) as client:
                wait_for(lambda: _ready(client), what="the filing-time daemon's demo model READY", timeout=120)
            return target
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ready(client) -> bool:
    try:
        return client.model_ready("demo")
    except Exception:   # not listening yet
        return False
