"""The e2e puppet client (tests/e2e/client_script.py) plus what the live tests need.

    python tests/live/live_client.py SOCKET

Same line protocol as the e2e puppet (one JSON command in, one JSON answer out, as an
unprivileged user). Extra commands:

- ``wait_event`` {event, timeout}: read events until one named ``event`` arrives; answers
  the event and, for lease_revoked, whether the client library closed the lease's
  device fds (it does on reading the event: iommud.client.ClaimResult);
- ``fds_closed``: which claimed devices' fds are closed now;
- ``forget_device`` {bdf}: drop a device (its fd is already closed by the library).

Test code only; runs inside the lab guest as uid 1000.
"""

from __future__ import annotations

import sys
from typing import Any

from iommud.client import ClaimResult
from tests.e2e.client_script import Puppet, main


class LivePuppet(Puppet):
    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path)
        self.claims: dict[int, ClaimResult] = {}

    def claim(self, c: dict[str, Any]) -> dict[str, Any]:
        answer = super().claim(c)
        # The library closes this ClaimResult's fds when the lease is revoked.
        res = self.client.lease(answer["lease_id"])
        if res is not None:
            self.claims[answer["lease_id"]] = res
        return answer

    def wait_event(self, c: dict[str, Any]) -> dict[str, Any]:
        while True:
            ev = self.client.next_event(c.get("timeout", 30.0))
            if ev is None:
                return {"event": None}
            if ev.event == c["event"]:
                out: dict[str, Any] = {"event": ev.model_dump(mode="json")}
                lease = getattr(ev, "lease_id", None)
                if lease in self.claims:
                    res = self.claims[lease]
                    out["fds_closed"] = all(d.fd.closed for d in res.devices)
                    out["revoked"] = res.revoked
                return out

    def fds_closed(self, _c: dict[str, Any]) -> dict[str, Any]:
        return {"closed": {bdf: d.fd.closed for bdf, d in self.devices.items()}}

    def forget_device(self, c: dict[str, Any]) -> dict[str, Any]:
        self.edus.pop(c["bdf"], None)
        dev = self.devices.pop(c["bdf"])
        dev.fd.close()
        return {}


if __name__ == "__main__":
    sys.exit(main(LivePuppet))
