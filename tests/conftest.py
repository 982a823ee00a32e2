"""Shared pytest setup: a short shutdown grace so test stacks stop quickly."""

from __future__ import annotations

import logging

logging.getLogger("switchboard").setLevel(logging.INFO)
