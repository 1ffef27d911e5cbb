"""structlog configuration for the daemon process (called once, from iommud.app).

JSON lines on stdout when stdout is not a TTY (journald, CI), the console renderer when
it is. Tracebacks never carry local variables (they would copy client bytes into the
log) and every string value is cut to ``MAX_VALUE`` characters, so a peer can put at most
a bounded excerpt of what it sent into a log line. Library modules only do
``log = structlog.get_logger(__name__)`` and never call ``configure`` themselves;
this module must stay the only place that does.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
import structlog.tracebacks

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}

MAX_VALUE = 1024
"""Longest string value (and exception message) a log line carries."""
_MAX_FRAMES = 20


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE else f"{text[:MAX_VALUE]}...[{len(text)} chars]"


def bound_values(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """Cut long strings, including the messages inside rendered tracebacks."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MAX_VALUE:
            event[key] = _cut(value)
        elif key == "exception" and isinstance(value, list):
            for exc in value:
                if isinstance(exc, dict) and isinstance(exc.get("exc_value"), str):
                    exc["exc_value"] = _cut(exc["exc_value"])
    return event


def level_from_name(name: str) -> int:
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}") from None


def configure(
    *, level: str = "info", stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Set up structlog. ``json=None`` picks JSON unless ``stream`` is a TTY."""
    out = sys.stdout if stream is None else stream
    use_json = (not out.isatty()) if json is None else json
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        transformer = structlog.tracebacks.ExceptionDictTransformer(
            show_locals=False, max_frames=_MAX_FRAMES
        )
        shared.append(structlog.processors.ExceptionRenderer(transformer))
    else:
        # plain_traceback: no locals (rich's formatter would print them)
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    shared.append(bound_values)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_from_name(level)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,  # a bound logger per call cost 24 us a line
    )
