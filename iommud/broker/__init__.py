"""The broker: the daemon's state owner (sessions, groups, leases, IOAS, mappings).

The server drives it through :class:`Broker` only; see :mod:`iommud.broker.core`.
"""

from iommud.broker.core import Broker
from iommud.broker.state import Outcome, Session

__all__ = ["Broker", "Outcome", "Session"]
