"""The event hub and a session's queue: typed events built once, one delivery rule.

Pure of I/O: the hub builds typed protocol events from a host view's ``HostChange``,
queues every event for every session, marks a lease holder's own lease_revoked
``for_holder`` (the connection lets only that through an unmatching subscription), and
a full queue drops its oldest event and says so in the log, at the 1st, 2nd, 4th... drop.
"""

from __future__ import annotations

from structlog.testing import capture_logs

from iommud.broker.events import Delivery, EventHub, EventSink
from iommud.broker.hostview import HostChange
from iommud.host.viability import Offender, Viability
from iommud.protocol import messages as m
from iommud.protocol.codec import decode_server, encode
from iommud.protocol.connection import ServerConnection
from iommud.protocol.limits import DEFAULT_LIMITS, PROTOCOL_VERSION
from iommud.protocol.v2 import ClaimMode, downgrade_event
from iommud.watch import HostAction, HostEvent

NIC = "0000:01:03.0"


def test_host_events_are_typed_and_stamped_in_order() -> None:
    hub = EventHub(wall_clock=lambda: 12.5)
    change = HostChange(
        4,
        (HostEvent(HostAction.BIND, NIC, "e1000"), HostEvent(HostAction.CHANGE, NIC)),
        Viability(4, True, ()),
        Viability(4, False, (Offender(NIC, "e1000"), Offender("platform-dev", "x"))),
    )
    events = hub.host_events(change)
    assert events == [
        m.DriverBound(ts=12.5, seq=1, bdf=NIC, driver="e1000", group_id=4),
        m.ViabilityChanged(
            ts=12.5,
            seq=2,
            group_id=4,
            is_viable=False,
            offenders=(m.Offender(bdf=NIC, driver="e1000"),),  # no BDF, not on the wire
        ),
    ]
    same = HostChange(4, (), Viability(4, True, ()), Viability(4, True, ()))
    assert hub.host_events(same) == []


def test_only_the_holders_lease_revoked_passes_a_subscription() -> None:
    """Every session gets the event queued; the holder's is marked and passes its filter."""
    hub = EventHub(wall_clock=lambda: 1.0)
    holder, other = EventSink(session_id=1), EventSink(session_id=2)
    ev = hub.make(
        m.EventName.LEASE_REVOKED,
        lease_id=7,
        group_id=4,
        reason="gone",
        mode=ClaimMode.BROKERED,
        grace_s=None,
    )
    assert hub.publish(ev, [holder, other], must_reach=holder) == 2
    mine, theirs = holder.queue.get_nowait(), other.queue.get_nowait()
    assert (mine, theirs) == (Delivery(ev, for_holder=True), Delivery(ev, for_holder=False))
    for sink_item in (mine, theirs):
        conn = ServerConnection()
        conn.receive(*encode(m.Hello(id=1, version=PROTOCOL_VERSION, client="t")))
        conn.send_reply(
            m.HelloReply(
                id=1,
                version=PROTOCOL_VERSION,
                server="iommud",
                capabilities=(),
                limits=DEFAULT_LIMITS,
            )
        )
        conn.receive(*encode(m.Subscribe(id=2, events=(m.EventName.DRIVER_BOUND,))))
        conn.send_reply(m.SubscribeReply(id=2))
        out = conn.send_event(sink_item.event, for_holder=sink_item.for_holder)
        if sink_item.for_holder:
            assert out is not None
            assert decode_server(*out) == downgrade_event(ev)  # v1's form on a v1 connection
            assert b"grace_s" not in out[0]
        else:
            assert out is None


def test_a_full_queue_drops_the_oldest_and_logs_at_powers_of_two() -> None:
    hub = EventHub(wall_clock=lambda: 1.0)
    sink = EventSink(session_id=9)
    size = sink.queue.maxsize
    with capture_logs() as logs:
        for i in range(size + 5):
            hub.publish(hub.make(m.EventName.DEVICE_ADDED, bdf=NIC, group_id=i), [sink])
    assert sink.dropped == 5
    assert sink.queue.qsize() == size
    assert sink.queue.get_nowait().event.group_id == 5  # type: ignore[attr-defined]
    dropped = [e for e in logs if e["event"] == "events.dropped"]
    assert [(e["session"], e["dropped"], e["log_level"]) for e in dropped] == [
        (9, 1, "warning"),
        (9, 2, "warning"),
        (9, 4, "warning"),
    ]
