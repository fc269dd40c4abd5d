"""scripts/install-test-services, which `make test` runs first: it installs only what is missing, with apt-get as
root or through password-less sudo, and otherwise says in one line what to install. apt-get, sudo and id are stubs
here (on a PATH holding nothing else), so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-test-services"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """Runs the script with `uid` (the stub id's answer), `sudo` ("ok", "password" or None for no sudo),
    `apt` (whether apt-get exists) and which services are present; returns (result, apt-get/sudo call log)."""
    def run(uid=0, sudo=None, apt=True, chromium=False, postgres=False):
        bin_ = tmp_path / "bin"
        bin_.mkdir(exist_ok=True)
        for tool in ("bash", "env", "true"):
            (bin_ / tool).unlink(missing_ok=True)
            (bin_ / tool).symlink_to(shutil.which(tool))
        log = tmp_path / "calls.log"
        log.write_text("")
        _stub(bin_, "id", f'[ "$1" = -u ] && echo {uid}')
        (bin_ / "apt-get").unlink(missing_ok=True)
        (bin_ / "sudo").unlink(missing_ok=True)
        if apt:
            _stub(bin_, "apt-get", f'echo "apt-get $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}}" >> {log}')
        if sudo:
            _stub(bin_, "sudo", f'[ "$1" = -n ] && shift; [ {sudo} = ok ] || exit 1; '
                                f'[ "$1" = true ] || echo "sudo $*" >> {log}; exec "$@"')
        browser = tmp_path / "chromium"
        browser.write_text("")
        browser.chmod(0o755 if chromium else 0o644)
        pg_bin = tmp_path / "pg"
        pg_bin.mkdir(exist_ok=True)
        (pg_bin / "initdb").unlink(missing_ok=True)
        if postgres:
            _stub(pg_bin, "initdb", "")
        env = {"PATH": str(bin_), "LORAFIT_CHROMIUM": str(browser), "LORAFIT_PG_BIN": str(pg_bin)}
        done = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        return done, log.read_text().splitlines()
    return run


def test_nothing_missing_installs_nothing(sandbox):
    done, calls = sandbox(uid=1000, chromium=True, postgres=True)
    assert done.returncode == 0, done.stderr
    assert calls == []


def test_root_installs_only_what_is_missing(sandbox):
    done, calls = sandbox(uid=0, chromium=False, postgres=True)
    assert done.returncode == 0, done.stderr
    assert calls == ["apt-get update DEBIAN_FRONTEND=",
                     "apt-get install -y chromium DEBIAN_FRONTEND=noninteractive"]
    done, calls = sandbox(uid=0)
    assert calls[-1] == "apt-get install -y chromium postgresql DEBIAN_FRONTEND=noninteractive"


def test_passwordless_sudo_is_used(sandbox):
    done, calls = sandbox(uid=1000, sudo="ok", chromium=True)
    assert done.returncode == 0, done.stderr
    assert calls == ["sudo apt-get update", "apt-get update DEBIAN_FRONTEND=",
                     "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql",
                     "apt-get install -y postgresql DEBIAN_FRONTEND=noninteractive"]


@pytest.mark.parametrize("sudo, apt", [("password", True), (None, True), ("ok", False)])
def test_otherwise_one_line_says_what_to_install(sandbox, sudo, apt):
    done, calls = sandbox(uid=1000, sudo=sudo, apt=apt)
    assert done.returncode == 1
    assert calls == []
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "chromium postgresql" in lines[0], done.stderr
    assert ("apt-get install -y chromium postgresql" in lines[0]) == apt
