"""The test session may read and run nothing outside the repository and its Python.

Issue 11: the suite once read `../shared/specs/...`, a folder that only existed beside the
developers' checkout, so it failed on every fresh clone. This guard makes that class of
mistake fail loudly wherever it happens: conftest.py installs an audit hook
(`sys.addaudithook`) that sees every `open()` / `os.open()` and every process start in the
test process, and the session fails if any of them names a path outside the allowed roots.
The offending call also raises `OutsideRepoError` at once, so the stack points at it.

Allowed, and why:
- the repository itself;
- the running Python: `sys.prefix` (the virtualenv), `sys.base_prefix` (the interpreter
  and its stdlib), their exec prefixes, and site-packages (the installed dependencies);
- the temporary directory (pytest's `tmp_path`, `tempfile`), except the repository's own
  siblings when the repository itself sits in it — `../anything` is what broke before;
- `/dev`, `/proc`, `/sys` (devices, process and CPU facts grpc/uvloop/psutil-like code reads);
- `/etc` (system configuration: resolver, hosts, TLS trust store, time zone, mime types);
- `/usr/share/zoneinfo` and `/usr/lib/ssl`, `/usr/share/ca-certificates`: the time-zone
  database and the system TLS trust store that /etc points into;
- one program: `uname`, which the stdlib's `platform` module runs for the processor
  name the SDKs put in their User-Agent headers.
Child processes are checked at start (their program must be in an allowed root, or be
`bash`/`sh` running a script of the repository); what a child reads afterwards is its own
business (it is the real CLI or a repository script, tested for behaviour).
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class OutsideRepoError(PermissionError):
    """A test read or ran something outside the repository and its Python."""


def _roots() -> tuple[str, ...]:
    roots = {str(REPO), sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             *site.getsitepackages(), "/dev", "/proc", "/sys", "/etc", "/usr/share/zoneinfo",
             "/usr/lib/ssl", "/usr/share/ca-certificates", tempfile.gettempdir()}
    # resolved forms too: /tmp may be a symlink, the venv's python a link into pyenv
    return tuple(sorted({os.path.realpath(r) for r in roots} | roots))


ROOTS = _roots()
_TEMP = os.path.realpath(tempfile.gettempdir())
_REPO_PARENT = str(REPO.parent)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_PROGRAMS = ("/usr/bin/uname", "/bin/uname")


def allowed(path: str, *, program: bool = False) -> bool:
    """True if `path` (absolute or relative to the working directory) may be touched."""
    p = os.path.abspath(path)
    if program and p in _PROGRAMS:
        return True
    if _under(p, str(REPO)):
        return True
    # The repo's siblings are never allowed, even when the repo lives in the temp dir.
    if _under(_REPO_PARENT, _TEMP) and _under(p, _REPO_PARENT):
        return False
    return any(_under(p, r) for r in ROOTS)


def _runs_repo_script(program: str, argv: Any) -> bool:
    """`bash scripts/x.sh`: the shell only interprets a script of the repository (as this
    Python interprets the tests); what the script runs is its own business, like a child's."""
    if os.path.basename(program) not in _SHELLS or isinstance(argv, (str, bytes)):
        return False
    args = [os.fsdecode(a) for a in argv]
    return len(args) > 1 and not args[1].startswith("-") and _under(
        os.path.abspath(args[1]), str(REPO))


_SHELLS = ("bash", "sh")

violations: list[str] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        path = args[0]
        if isinstance(path, int) or path is None:
            return  # an already open descriptor
        what = "opened"
    elif event == "subprocess.Popen":
        executable, argv, _cwd, env = args
        path = executable or (argv if isinstance(argv, (str, bytes)) else next(iter(argv)))
        path = os.fsdecode(path)
        if os.sep not in path:  # a bare name: where PATH (the child's, if given) finds it
            path = shutil.which(path, path=(env or os.environ).get("PATH")) or path
            if os.sep not in path:
                return  # not found: the start itself fails
        if _runs_repo_script(path, argv):
            return
        what = "ran"
    elif event in ("os.posix_spawn", "os.exec"):
        path = args[0]
        what = "ran"
    else:
        return
    path = os.fsdecode(path)
    if not allowed(path, program=what == "ran"):
        message = f"{what} {path!r}, outside the repository and its Python (tests/fsguard.py)"
        violations.append(message)
        raise OutsideRepoError(message)


_installed = False


def install() -> None:
    """Installs the audit hook once per process (hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True
