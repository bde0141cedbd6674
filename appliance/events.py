"""Operator-visible events as one structured log line each.

`event("session.created", session="web-1", vm="web")` logs
``event=session.created session=web-1 vm=web`` through the ``appliance.events`` logger:
one line a log shipper can split on spaces and ``=`` without a grammar, values quoted
(JSON string syntax) only when they hold spaces, quotes or ``=``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

log = logging.getLogger("appliance.events")


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


def format_event(name: str, fields: Mapping[str, object]) -> str:
    """The line of one event; fields whose value is None are left out."""
    parts = [f"event={name}"]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def event(name: str, level: int = logging.INFO, /, **fields: object) -> str:
    """Log one event; returns its line (jobs keep it in their own log as well)."""
    line = format_event(name, fields)
    log.log(level, line)
    return line
