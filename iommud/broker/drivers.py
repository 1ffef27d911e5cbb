"""Driver changes for owned groups: pin driver_override, rebind to vfio-pci, restore.

Every sysfs write goes through the kernel layer's DriverBinder on a thread under a
timeout, because writes can block: unbinding vfio-pci waits until every holder of the
device has closed it (drivers/vfio/vfio_main.c, vfio_unregister_group_dev). A write that
outlives its timeout cannot be cancelled (the thread sits in the kernel), so the restore
keeps waiting for it in the background and is reported as pending until it completes; a
restore step that fails is retried with a delay.

Those threads are the kernel layer's sysfs pool of daemon threads (iommud.kernel.aio),
never the loop's default executor, so one unbind stuck behind a client's open device fd
cannot hang the daemon's SIGTERM: :meth:`DriverManager.aclose`'s grace is the real
bound; what is left pending stays in the journal and the next start restores it.

Write-ahead: the journal records a device's original driver and override BEFORE the
first write to it, and forgets it only once the device is back.

Decides nothing about who may be rebound (the claim code asks iommud.policy).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from typing import Final

import structlog

from iommud.broker.journal import Journal, JournalEntry
from iommud.errors import KernelError
from iommud.kernel import aio
from iommud.kernel.interface import DriverBinder

log = structlog.get_logger(__name__)

VFIO_PCI: Final = "vfio-pci"
# The longest pause between two binds refused with EBUSY: after the holder closes its
# fd, the device is back within about this long.
BUSY_RETRY_MAX: Final = 2.0
UNBIND_WAIT: Final = "unbind from vfio-pci: waits until every holder of the device fd closes it"


class DriverManager:
    """Off-loop sysfs driver changes with a timeout, plus background restores."""

    def __init__(
        self,
        binder: DriverBinder,
        journal: Journal,
        *,
        timeout: float = 10.0,
        retries: int = 5,
        retry_delay: float = 0.5,
    ) -> None:
        self._binder = binder
        self._journal = journal
        self._timeout = timeout
        self._retries = retries
        self._retry_delay = retry_delay
        self._tasks: set[asyncio.Task[None]] = set()
        self.pending: dict[str, str] = {}  # bdf -> what we are still waiting for

    async def run(self, op: str, fn: Callable[[], object]) -> None:
        """Run one blocking step in a thread; KernelError(ETIMEDOUT) after the timeout.

        On timeout the thread keeps running (it cannot be interrupted); callers that
        must see it finish use :meth:`restore`, which keeps waiting.
        """
        fut = aio.submit(op, fn)
        done, _ = await asyncio.wait({fut}, timeout=self._timeout)
        if not done:
            fut.add_done_callback(_consume)
            raise KernelError(op, 110, f"{op} did not finish within {self._timeout}s")  # ETIMEDOUT
        fut.result()

    async def journal(self, entries: list[JournalEntry]) -> None:
        await aio.call("journal_write", self._journal.record, entries)

    async def pin(self, bdf: str) -> None:
        await self.run("driver_override", lambda: self._binder.set_driver_override(bdf, VFIO_PCI))
        log.info("driver.override_pinned", bdf=bdf, driver=VFIO_PCI)

    async def to_vfio(self, bdf: str) -> None:
        """Move a device to vfio-pci (its override is already pinned): unbind, probe."""

        def step() -> None:
            self._binder.unbind(bdf)
            self._binder.drivers_probe(bdf)
            now = self._binder.current_driver(bdf)
            if now != VFIO_PCI:
                raise KernelError(
                    "drivers_probe", 19, f"{bdf} did not bind to vfio-pci", bdf=bdf, driver=now
                )  # ENODEV

        await self.run("rebind", step)
        log.info("driver.rebound", bdf=bdf, driver=VFIO_PCI)

    def _restore_step(self, entry: JournalEntry) -> None:
        b = self._binder
        bdf = entry.bdf
        b.set_driver_override(bdf, entry.original_override)
        if not entry.rebound:
            return
        now = b.current_driver(bdf)
        if now is not None and now != entry.original_driver:
            # vfio-pci's remove waits until every holder of the device fd has closed it
            # (drivers/vfio/vfio_main.c, vfio_unregister_group_dev): this write blocks.
            b.unbind(bdf)
            now = b.current_driver(bdf)
        if entry.original_driver is not None and now is None:
            # Written from this worker thread: one dict store, read on the loop only
            # to report what is awaited.
            self.pending[bdf] = f"bind to {entry.original_driver}"
            b.bind(entry.original_driver, bdf)
            now = b.current_driver(bdf)
        if now != entry.original_driver:
            # The journal keeps a device until it is really back: a bind that "worked"
            # but left another driver (or none) is a failure to retry.
            raise KernelError(
                "restore",
                errno.ENODEV,
                f"{bdf} is on {now}, not its recorded driver {entry.original_driver}",
                bdf=bdf,
                driver=now,
            )

    async def restore(self, entries: list[JournalEntry]) -> list[str]:
        """Put devices back; returns the BDFs still pending when the timeout hit.

        Pending restores continue in the background (see :meth:`aclose`).
        """
        pending: list[str] = []
        for entry in entries:
            task = asyncio.create_task(self._restore_one(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            done, _ = await asyncio.wait({task}, timeout=self._timeout)
            if not done:
                pending.append(entry.bdf)
                log.warning(
                    "driver.restore_pending",
                    bdf=entry.bdf,
                    waiting_for=self.pending.get(entry.bdf, "unbind"),
                )
        return pending

    def restore_in_background(self, entries: list[JournalEntry]) -> asyncio.Task[None]:
        """Put a group's devices back (after a release, or a crashed run's), one after
        the other, in one background task.

        Devices that go back to a driver of their own (e1000) come first: their probe is
        refused (EBUSY) while a client still owns the group (a device fd kept open,
        maybe across a daemon crash; docs: the driver core refuses a driver without
        driver_managed_dma on a user-owned group), and that refusal is retried without
        a limit until the holder is gone. Only then are the vfio-pci members unbound:
        vfio-pci's unbind of a device still open blocks, uninterruptibly once signalled
        (drivers/vfio/vfio_main.c, vfio_unregister_group_dev), which would keep even a
        SIGKILLed daemon from exiting. Members on vfio-pci do not stop e1000's probe:
        only the group's ownership does. Nothing here has a deadline; ``pending`` says
        what is awaited. The caller decides how long it waits for the task.
        """
        truth = [self._journal.get(e.bdf) or e for e in entries]
        ordered = sorted(truth, key=lambda e: not (e.rebound and e.original_driver))

        async def run() -> None:
            for entry in ordered:
                self.pending[entry.bdf] = "queued behind the group's other devices"
            for entry in ordered:
                await self._restore_one(entry)

        task = asyncio.create_task(run(), name=f"restore:{','.join(e.bdf for e in entries)}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _restore_one(self, entry: JournalEntry) -> None:
        # The journal's entry is the truth: it was recorded before the daemon first
        # touched the device, and a later claim never replaces it (Journal.record).
        entry = self._journal.get(entry.bdf) or entry
        attempt = busy = 0
        self.pending[entry.bdf] = UNBIND_WAIT if entry.rebound else "driver_override"
        while True:
            attempt += 1
            try:
                await aio.call("restore", self._restore_step, entry)
            except KernelError as exc:
                if exc.errno == errno.EBUSY:
                    # The group is still user-owned: a client holds a device fd (maybe
                    # one a previous run of the daemon handed out). The probe succeeds
                    # once it is closed; no limit on attempts, gently, logged sparsely.
                    busy += 1
                    self.pending[entry.bdf] = (
                        f"bind to {entry.original_driver}: group {entry.group_id} is still"
                        " in use (a client holds a device fd); retrying until it is closed"
                    )
                    if busy == 1 or busy % 100 == 0:
                        log.warning(
                            "driver.restore_waits_for_holder",
                            bdf=entry.bdf,
                            group_id=entry.group_id,
                            driver=entry.original_driver,
                            attempts=busy,
                        )
                    await asyncio.sleep(min(self._retry_delay * busy, BUSY_RETRY_MAX))
                    continue
                log.warning(
                    "driver.restore_failed",
                    bdf=entry.bdf,
                    attempt=attempt,
                    op=exc.op,
                    errno=exc.errno,
                )
                if attempt - busy >= self._retries:
                    self.pending[entry.bdf] = f"gave up after {attempt} attempts: {exc.message}"
                    log.exception("driver.restore_abandoned", bdf=entry.bdf, error=exc.message)
                    return  # the journal keeps the entry: the next start retries
                await asyncio.sleep(self._retry_delay * attempt)
                continue
            except Exception as exc:
                # Not the kernel's answer: a bug or the daemon short of a resource (a
                # worker, memory). Retried and recorded like a kernel error, never
                # dropped as a task's unretrieved exception.
                log.exception("driver.restore_crashed", bdf=entry.bdf, attempt=attempt)
                if attempt - busy >= self._retries:
                    self.pending[entry.bdf] = f"gave up after {attempt} attempts: {exc!r}"[:512]
                    return  # the journal keeps the entry: the next start retries
                await asyncio.sleep(self._retry_delay * attempt)
                continue
            break
        try:
            await aio.call("journal_write", self._journal.drop, [entry.bdf])
        finally:
            # Only now: a claim that saw nothing pending must not find the restore running.
            self.pending.pop(entry.bdf, None)
        log.info(
            "driver.restored",
            bdf=entry.bdf,
            driver=entry.original_driver,
            override=entry.original_override,
            attempts=attempt,
        )

    async def aclose(self, grace: float) -> None:
        """Wait (bounded) for background restores still running."""
        if self._tasks:
            _done, not_done = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in not_done:
                log.error("driver.restore_unfinished", task=t.get_name())
                t.cancel()


def _consume(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("driver.late_failure", error=str(fut.exception()))
