"""The guard in tests/fsguard.py trips: reading a file beside the repository, or running a
program outside the allowed roots, raises at once and fails the pytest session even when
the test swallows the error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fsguard


@pytest.fixture
def own_violations() -> Iterator[None]:
    """The violations these tests cause on purpose are taken back, so the session passes."""
    before = len(fsguard.violations)
    yield
    assert len(fsguard.violations) > before, "the guard recorded nothing"
    del fsguard.violations[before:]


def test_reading_a_sibling_of_the_repository_trips(own_violations: None) -> None:
    # The exact mistake of issue 11: ../shared/... read relative to the repository.
    sibling = fsguard.REPO.parent / "shared" / "specs" / f"probe-{uuid.uuid4().hex}.yaml"
    with pytest.raises(fsguard.OutsideRepoError, match="outside the repository"):
        sibling.read_text()


def test_reading_an_existing_file_outside_trips(own_violations: None) -> None:
    outside = Path(tempfile.mkdtemp(prefix=".sb-fsguard-", dir=fsguard.REPO.parent))
    try:
        probe = outside / "secret.txt"
        # written by a child process: the guard watches this process only
        subprocess.run([sys.executable, "-c", f"open({str(probe)!r}, 'w').write('x')"], check=True)
        assert probe.exists()  # a stat, not a read: allowed
        with pytest.raises(fsguard.OutsideRepoError):
            open(probe).read()
        with pytest.raises(fsguard.OutsideRepoError):
            os.open(probe, os.O_RDONLY)
    finally:  # removed by a child too (rmtree opens the directory, which would trip)
        subprocess.run([sys.executable, "-c", f"import shutil; shutil.rmtree({str(outside)!r})"],
                       check=True)
    assert not outside.exists()


def test_running_a_program_outside_trips(own_violations: None) -> None:
    true = shutil.which("true")
    assert true is not None and not fsguard.allowed(true)
    with pytest.raises(fsguard.OutsideRepoError, match="ran"):
        subprocess.run([true], check=True)
    with pytest.raises(fsguard.OutsideRepoError, match="ran"):
        subprocess.run(["true"], check=True)  # found on PATH: still outside


def test_a_shell_may_run_a_repository_script_only(own_violations: None) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    script = str(fsguard.REPO / "scripts" / "container_check.sh")
    fsguard._hook("subprocess.Popen", (None, ["bash", script], None, None))  # allowed: no raise
    with pytest.raises(fsguard.OutsideRepoError):
        fsguard._hook("subprocess.Popen", (None, ["bash", "-c", f"cat {script}"], None, None))
    with pytest.raises(fsguard.OutsideRepoError):
        fsguard._hook("subprocess.Popen", (bash, ["bash", "/etc/profile"], None, None))


def test_allowed_roots() -> None:
    assert fsguard.allowed(str(fsguard.REPO / "README.md"))
    assert fsguard.allowed(os.__file__)  # the stdlib
    assert fsguard.allowed(pytest.__file__)  # site-packages
    assert fsguard.allowed(os.path.join(tempfile.gettempdir(), "x"))
    assert not fsguard.allowed(str(fsguard.REPO.parent / "shared"))
    assert not fsguard.allowed(os.path.expanduser("~/.ssh/id_rsa"))


def test_a_swallowed_violation_still_fails_the_session(tmp_path: Path) -> None:
    """A test that catches OutsideRepoError still fails the run (pytest_sessionfinish)."""
    sibling = fsguard.REPO.parent / f"probe-{uuid.uuid4().hex}"
    (tmp_path / "test_sneaky.py").write_text(
        "def test_sneaky():\n"
        "    try:\n"
        f"        open({str(sibling)!r})\n"
        "    except OSError:\n"
        "        pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p",
                          "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=fsguard.REPO, capture_output=True, text=True, timeout=120)
    assert "1 passed" in run.stdout, run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert f"opened '{sibling}'" in run.stderr
