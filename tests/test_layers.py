"""The layers hold, and the checker that holds them would notice a break (issue 12, item 1).

`lint-imports` (import-linter, contracts in pyproject's [tool.importlinter]) runs in CI;
here it runs on the repository as committed, and then on a copy of the code with one
forbidden import added per contract, which must break exactly that contract. Without the
second half a misconfigured contract (a typo in a module name, a pattern that matches
nothing) would pass forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"

FACADE = "The façade imports from the core only its contract"
STANDALONE = "The contract modules stand alone"
CORE = "The core never imports the façade"
COMPOSITION = "Nothing in the core imports the composition root"
PROVIDERS = "Providers know nothing of routing"
CIRCLE = "No gateway <-> observe import circle"
CONTRACTS = (FACADE, STANDALONE, CORE, COMPOSITION, PROVIDERS, CIRCLE)


def lint(root: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(root / "typecheck")}
    run = subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    # Rich wraps long contract names: join the lines back for matching.
    return run.returncode, " ".join((run.stdout + run.stderr).split())


def verdicts(output: str) -> dict[str, str]:
    found = {}
    for name in CONTRACTS:
        at = output.find(name)
        assert at >= 0, f"contract {name!r} not in the output:\n{output}"
        # The summary line: the name, the rest of it, then KEPT or BROKEN.
        kept, broken = (output.find(word, at) for word in ("KEPT", "BROKEN"))
        found[name] = "KEPT" if 0 <= kept and (broken < 0 or kept < broken) else "BROKEN"
    return found


def test_the_repository_keeps_every_contract() -> None:
    code, out = lint(ROOT)
    assert code == 0, out
    assert set(verdicts(out).values()) == {"KEPT"}, out
    assert "Contracts: 6 kept, 0 broken" in out, out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code, the link tree and pyproject, copied once (links stay links)."""
    src = tmp_path_factory.mktemp("pristine")
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("core", "facade", "typecheck"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", src / "pyproject.toml")
    return src


BREAKS = [
    (FACADE, "facade/app.py", "from switchboard.core import gateway as _gateway\n"),
    (FACADE, "facade/transport.py", "from switchboard.core.keys import KeyRing as _KeyRing\n"),
    (STANDALONE, "core/contract.py", "from switchboard.core import config as _config\n"),
    (CORE, "core/gateway.py", "from switchboard.facade import openai_json as _oj\n"),
    (COMPOSITION, "core/server.py", "from switchboard.core.composition import state as _state\n"),
    (PROVIDERS, "core/providers/base.py", "from switchboard.core import router as _router\n"),
    # The circle was a TYPE_CHECKING import: those count too.
    (CIRCLE, "core/observe.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from switchboard.core.gateway import Gateway\n"),
]


@pytest.mark.parametrize(("contract", "module", "line"), BREAKS,
                         ids=[f"{m}" for _, m, _ in BREAKS])
def test_each_contract_breaks_when_violated(pristine: Path, tmp_path: Path, contract: str,
                                            module: str, line: str) -> None:
    root = tmp_path / "repo"
    shutil.copytree(pristine, root, symlinks=True)
    target = root / module
    target.write_text(target.read_text() + "\n" + line)
    code, out = lint(root)
    assert code == 1, out
    broken = {name for name, verdict in verdicts(out).items() if verdict == "BROKEN"}
    assert contract in broken, out
    # One added import breaks only the contract it violates: the others still hold.
    assert broken == {contract}, out
