"""The launcher renders one SandboxProfile value for each platform."""
import os



def test_launcher_renders_the_worker_profile_into_a_sandbox_exec_command(tmp_path):
    """The same SandboxProfile value that drives bubblewrap on Linux drives sandbox-exec on macOS."""
    from sealbox.sandbox.launcher import seatbelt_command
    from sealbox.sandbox.profile import SandboxProfile

    profile = SandboxProfile(engine="mlx", python="/opt/sealbox/venv/bin/python",
                             runtime_paths=("/opt/sealbox/venv", "/opt/sealbox/code"))
    sock_dir, tmp_dir = tmp_path / "sock", tmp_path / "tmp"
    command = seatbelt_command(profile, str(sock_dir), str(tmp_dir), [str(tmp_path / "model")], '{"engine": "mlx"}')
    assert command[:2] == ["/usr/bin/sandbox-exec", "-p"]
    assert command[3:] == ["/opt/sealbox/venv/bin/python", "-m", "sealbox.worker.main", '{"engine": "mlx"}']
    text = command[2]
    assert text.startswith("(version 1)\n(deny default)\n")
    for path in ("/opt/sealbox/venv", "/opt/sealbox/code", str(tmp_path / "model")):
        assert f'(subpath "{os.path.realpath(path)}")' in text
    writable = text.split("(allow file-write*\n", 1)[1].split("\n)\n", 1)[0]
    assert [line.strip() for line in writable.splitlines()] == [
        f'(subpath "{os.path.realpath(sock_dir)}")', f'(subpath "{os.path.realpath(tmp_dir)}")']
    assert f'(path-literal "{os.path.realpath(sock_dir)}/worker.sock")' in text
    assert '(allow process-exec (literal "' in text and "(deny process-fork)" in text
    assert "network-outbound" not in text
