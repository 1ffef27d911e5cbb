"""Who may see whom (PROTOCOL.md section 9): a holder's uid, pid, lease and devices go to
its own uid and to root; every other peer learns that a group is held, not by whom."""

from __future__ import annotations

import pytest

from iommud.broker import Broker
from iommud.errors import BusyError
from iommud.policy import Identity
from iommud.protocol import messages as m
from iommud.protocol.v2 import StatusReplyV2, StatusV2
from tests.broker.support import ALICE, BOB, EDU, MALLORY, ROOT, Client

HIDDEN = m.Owner(uid=None, pid=None)


async def _owner(c: Client, group_id: int) -> m.Owner | None:
    reply = await c.call(m.ListGroups(id=c.next_id()))
    assert isinstance(reply, m.ListGroupsReply)
    (entry,) = [g for g in reply.groups if g.group_id == group_id]
    return entry.owner


async def _leases(c: Client, version: int) -> list[tuple[int, int, tuple[str, ...]]]:
    request = m.Status(id=c.next_id()) if version == 1 else StatusV2(id=c.next_id())
    reply = await c.call(request)
    assert isinstance(reply, m.StatusReply if version == 1 else StatusReplyV2)
    return [(le.uid, le.pid, le.devices) for le in reply.leases]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    ("viewer", "sees"),
    [(ALICE, True), (BOB, True), (ROOT, True), (MALLORY, False)],
    ids=["holder", "same-uid", "root", "other-uid"],
)
async def test_list_groups_and_status_show_the_holder_only_to_its_uid_and_root(
    broker: Broker, viewer: Identity, sees: bool, version: int
) -> None:
    """Another uid sees owner {uid: null, pid: null} (held, by someone) and no lease, in
    v1's status and in v2's."""
    holder = Client(broker, ALICE)
    await holder.claim(EDU)
    other = holder if viewer is ALICE else Client(broker, viewer)
    mine = m.Owner(uid=ALICE.uid, pid=ALICE.pid)
    assert await _owner(other, 3) == (mine if sees else HIDDEN)
    assert await _leases(other, version) == ([(1000, 4242, (EDU,))] if sees else [])
    if other is not holder:
        await other.close()
    await holder.close()


async def test_busy_for_another_uid_names_no_holder(broker: Broker) -> None:
    """The busy refusal tells a peer of another uid only that the group is held."""
    holder = Client(broker, ROOT)
    await holder.claim(EDU)
    alice = Client(broker, ALICE)
    with pytest.raises(BusyError) as ei:
        await alice.claim(EDU)
    assert ei.value.details == {"reason": "held", "group_id": 3}
    await alice.close()
    await holder.close()
