"""The uevent side: PCI uevents from the kernel turned into host-view refreshes.

- ``iommud.watch.source``: ``translate_uevent`` (pure), ``SeqnumTracker``,
  ``UdevSource`` (a netlink monitor on the loop yielding ``HostEvent`` and ``Resync``
  items) and ``open_monitor``.
- ``iommud.watch.watcher``: ``HostWatcher``, the thin glue that hands each item to the
  host view's owner (iommud.broker.hostview ``HostView``) and its ``HostChange`` reports
  to the broker; ``HostFollower`` is the daemon's watcher, opened before the broker's
  start-up read so that start-up reads the host once and loses no uevent.

This package keeps no view of the host, judges no viability and builds no wire event:
the host view and the broker's event hub do. It never writes sysfs.
"""

from iommud.watch.source import (
    HostAction,
    HostEvent,
    MonitorLike,
    Resync,
    SeqnumTracker,
    SourceFailedError,
    SourceItem,
    SourceKind,
    UdevSource,
    open_monitor,
    pick_source,
    translate_uevent,
)
from iommud.watch.watcher import (
    BrokerHooks,
    HostChangeSink,
    HostFollower,
    HostOwner,
    HostWatcher,
    broker_sink,
    watch_host,
)

__all__ = [
    "BrokerHooks",
    "HostAction",
    "HostChangeSink",
    "HostEvent",
    "HostFollower",
    "HostOwner",
    "HostWatcher",
    "MonitorLike",
    "Resync",
    "SeqnumTracker",
    "SourceFailedError",
    "SourceItem",
    "SourceKind",
    "UdevSource",
    "broker_sink",
    "open_monitor",
    "pick_source",
    "translate_uevent",
    "watch_host",
]
