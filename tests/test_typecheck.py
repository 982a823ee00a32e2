"""mypy sees the real contract (issue 11, item 3): `switchboard.*` resolves to our code and
the mypy-protobuf stubs, not to `Any`.

Two ways this could silently regress: the committed link tree that mypy checks
(typecheck/switchboard) drifting from pyproject's package mapping, or a config change
(e.g. a global ignore_missing_imports) turning every protobuf type back into Any, after
which `mypy` passes on anything. Each has a test below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "typecheck"


def test_link_tree_mirrors_the_package_mapping() -> None:
    """Every package pyproject installs resolves, through typecheck/, to the folder
    that setuptools installs it from; the root also carries every file it ships."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    for package in setuptools["packages"]:
        # The nearest mapped ancestor decides the folder (as setuptools does).
        parts = package.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in mapping:
                source = ROOT / mapping[".".join(parts[:n])] / Path(*parts[n:])
                break
        linked = TREE / Path(*parts) / "__init__.py"
        assert linked.is_file(), f"typecheck/ has no {package}: add a symlink for it"
        assert linked.resolve() == (source / "__init__.py").resolve(), \
            f"{linked} is {linked.resolve()}, not the one in {source}"
    root = ROOT / mapping["switchboard"]
    shipped = {p.name for p in root.iterdir() if p.name != "__pycache__"}
    linked_root = {p.name for p in (TREE / "switchboard").iterdir()}
    assert shipped <= linked_root, f"typecheck/switchboard lacks {sorted(shipped - linked_root)}"
    # Relative links only: the tree must work in any clone, wherever it is.
    for p in (TREE / "switchboard").iterdir():
        assert p.is_symlink() and not os.path.isabs(os.readlink(p)), p


BAD = '''\
from switchboard.core.errors import GatewayError
from switchboard.v1 import inference_pb2 as pb
from switchboard.v1 import inference_pb2_grpc as pb_grpc


def misuse(stub: pb_grpc.InferenceServiceStub, err: GatewayError) -> None:
    usage = pb.Usage()
    usage.prompt_tokens = "many"
    choice = pb.Choice(finish_reason="stop")
    stub.ListModels(pb.GetModelRequest())
    err.no_such_attribute
    reveal_type(usage.prompt_tokens)
'''


def test_mypy_reports_misuse_of_the_contract(tmp_path: Path) -> None:
    """The project's own mypy configuration, run on a small wrong snippet, reports each
    mistake: a str in an int field, a str for an enum, the wrong request message for an
    RPC, and an attribute our own (cross-module) class does not have."""
    bad = tmp_path / "bad.py"
    bad.write_text(BAD)
    # cwd is the repository so pyproject's relative mypy_path applies; the repository's
    # .mypy_cache keeps repeated runs to a few seconds.
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-error-summary", "--hide-error-context", str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = run.stdout.replace(str(bad), "bad.py")
    assert run.returncode == 1, run.stdout + run.stderr
    expected = [
        'bad.py:8: error: Incompatible types in assignment (expression has type "str", '
        'variable has type "int")',
        'bad.py:9: error: Argument "finish_reason" to "Choice" has incompatible type "str"',
        'bad.py:10: error: Argument 1 to "__call__" of "UnaryUnaryMultiCallable" has incompatible '
        'type "GetModelRequest"; expected "ListModelsRequest"',
        'bad.py:11: error: "GatewayError" has no attribute "no_such_attribute"',
        'bad.py:12: note: Revealed type is "int"',
    ]
    for line in expected:
        assert line in out, f"mypy did not report:\n  {line}\ngot:\n{out}"
