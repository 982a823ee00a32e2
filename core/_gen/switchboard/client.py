"""The typed gRPC client for internal services (implemented in switchboard.core.client)."""

from switchboard.core.client import *  # noqa: F403
from switchboard.core.client import __all__ as __all__
