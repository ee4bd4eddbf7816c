"""The macOS Seatbelt profile: its text checked structurally on every platform, enforced on macOS."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sealbox.sandbox import macos


def parse(text: str) -> list:
    """A small SBPL reader: nested lists of symbols and ("str", value) string literals."""
    stack: list[list] = [[]]
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ";":
            i = text.index("\n", i)
        elif ch == "(":
            stack.append([])
        elif ch == ")":
            done = stack.pop()
            stack[-1].append(done)
        elif ch == '"':
            value, i = [], i + 1
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                value.append(text[i])
                i += 1
            stack[-1].append(("str", "".join(value)))
        elif not ch.isspace():
            j = i
            while j < len(text) and not text[j].isspace() and text[j] not in "()":
                j += 1
            stack[-1].append(text[i:j])
            i = j - 1
        i += 1
    assert len(stack) == 1, "unbalanced parentheses"
    return stack[0]


def rules(forms: list, action: str, operation: str) -> list[list]:
    """The filters of every (action operation ...) form."""
    return [form[2:] for form in forms if form[:2] == [action, operation]]


def filter_paths(filters: list[list], kind: str) -> set[str]:
    return {f[1][1] for f in filters if f[0] == kind}


@pytest.fixture
def layout(tmp_path):
    model = tmp_path / "models" / "m1"
    model.mkdir(parents=True)
    (model / "weights.safetensors").write_bytes(b"x")
    sock_dir = tmp_path / "run" / "w1"
    sock_dir.mkdir(parents=True)
    private_tmp = tmp_path / "tmp-w1"
    private_tmp.mkdir()
    runtime = [os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)]
    return {"ro": [*runtime, str(model)], "rw": [str(sock_dir), str(private_tmp)],
            "sock": str(sock_dir / "worker.sock")}


def test_profile_denies_by_default_and_allows_only_what_is_named(layout):
    text = macos.seatbelt_profile(layout["ro"], layout["rw"], layout["sock"])
    assert text.startswith("(version 1)\n(deny default)\n")
    forms = parse(text)
    assert forms[:2] == [["version", "1"], ["deny", "default"]]

    (reads,) = rules(forms, "allow", "file-read*")
    assert filter_paths(reads, "subpath") == {*macos.SYSTEM_READ_ONLY, *layout["ro"], *layout["rw"]}
    assert filter_paths(reads, "literal") == set(macos.SYSTEM_READ_FILES)

    (writes,) = rules(forms, "allow", "file-write*")
    assert writes == [["subpath", ("str", p)] for p in layout["rw"]]
    assert all(form[1] != "file-write*" for form in forms if form not in [["allow", "file-write*", *writes]])

    (metadata,) = rules(forms, "allow", "file-read-metadata")
    assert "/" in filter_paths(metadata, "literal")   # ancestors only, for path resolution
    assert os.path.dirname(layout["sock"]) not in filter_paths(metadata, "literal")

    # Network: the one Unix socket, nothing else.
    network = [form for form in forms if any(str(x).startswith("network") for x in form[1:2])]
    assert network == [["allow", "network-bind", "network-inbound",
                        ["local", "unix-socket", ["path-literal", ("str", layout["sock"])]]]]
    assert "remote" not in text and "network-outbound" not in text

    # Metal for MLX.
    (iokit,) = rules(forms, "allow", "iokit-open")
    assert {f[1][1] for f in iokit} == {"AGXDeviceUserClient", "AGXSharedUserClient", "IOGPUDeviceUserClient",
                                        "IOSurfaceRootUserClient"}
    (mach,) = rules(forms, "allow", "mach-lookup")
    assert mach == [["global-name", ("str", "com.apple.MTLCompilerService")]]

    # No exec and no fork once running.
    assert ["deny", "process-exec"] in forms and ["deny", "process-fork"] in forms
    assert not rules(forms, "allow", "process-exec") and not rules(forms, "allow", "process-fork")


def test_exec_once_allows_exactly_the_interpreter(layout):
    python = os.path.realpath(sys.executable)
    forms = parse(macos.seatbelt_profile(layout["ro"], layout["rw"], layout["sock"], exec_once=python))
    assert rules(forms, "allow", "process-exec") == [[["literal", ("str", python)]]]
    assert ["deny", "process-exec"] not in forms


def test_backslashes_are_escaped(layout, tmp_path):
    odd = tmp_path / "odd\\name (v2)"
    odd.mkdir()
    text = macos.seatbelt_profile([*layout["ro"], str(odd)], layout["rw"], layout["sock"])
    assert '"' + str(odd).replace("\\", "\\\\") + '"' in text
    (reads,) = rules(parse(text), "allow", "file-read*")
    assert str(odd) in filter_paths(reads, "subpath")


@pytest.mark.parametrize("bad, why", [
    ('/models/evil") (allow default', "double quote"),
    ("/models/line\nbreak", "control character"),
    ("/models/tab\there", "control character"),
    ("/models/del\x7f", "control character"),
    ("relative/model", "not absolute"),
])
def test_bad_paths_are_refused(layout, bad, why):
    with pytest.raises(macos.ProfileError, match=why):
        macos.seatbelt_profile([*layout["ro"], bad], layout["rw"], layout["sock"])
    with pytest.raises(macos.ProfileError, match=why):
        macos.seatbelt_profile(layout["ro"], [*layout["rw"], bad], layout["sock"])


def test_socket_outside_the_writable_paths_is_refused(layout, tmp_path):
    with pytest.raises(macos.ProfileError, match="not beneath a read-write path"):
        macos.seatbelt_profile(layout["ro"], layout["rw"], str(tmp_path / "elsewhere.sock"))


@pytest.mark.skipif(sys.platform != "darwin" or not shutil.which("sandbox-exec"),
                    reason="sandbox-exec exists only on macOS")
def test_profile_is_enforced_by_sandbox_exec(layout, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    import sealbox
    code_dirs = [os.path.realpath(p) for p in sealbox.__path__]
    python = os.path.realpath(sys.executable)
    profile = macos.seatbelt_profile([*layout["ro"], *code_dirs], layout["rw"], layout["sock"], exec_once=python)
    probe = textwrap.dedent(f"""
        import os, socket, subprocess
        out = []
        out.append(open({str(layout['ro'][-1]) + '/weights.safetensors'!r}, 'rb').read() == b'x')
        try:
            open({str(secret)!r}).read(); out.append('read secret')
        except PermissionError:
            out.append('secret denied')
        with open(os.path.join({layout['rw'][1]!r}, 'scratch'), 'w') as f:
            f.write('ok')
        out.append('tmp write ok')
        try:
            subprocess.run(['/bin/echo', 'escaped']); out.append('exec ran')
        except PermissionError:
            out.append('exec denied')
        s = socket.socket(socket.AF_UNIX); s.bind({layout['sock']!r}); out.append('socket ok')
        print(out)
    """)
    result = subprocess.run(["sandbox-exec", "-p", profile, python, "-c", probe],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[True, 'secret denied', 'tmp write ok', 'exec denied', 'socket ok']", \
        result.stderr
