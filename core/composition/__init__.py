"""The composition root: the one place that imports both the core and the façade and
wires them into a process. `runtime.py` starts the listeners (the Gateway, the gRPC
server, the REST app behind its slow-client guard); `state.py` opens the store, ledger
and limiter a Gateway needs; `cli.py` (with `cli_admin.py`) is the `switchboard` command.
Nothing else in `switchboard.core` may import this package or the façade
(pyproject.toml, [tool.importlinter]; docs/architecture.md)."""
