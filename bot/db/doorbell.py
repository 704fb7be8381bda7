"""The doorbell: tells an idle worker that a job was queued, so it claims at once instead of at its next poll.

A ring is only a hint. The queue is the jobs table, and a worker that misses a ring still finds
the job at its next poll; a spurious ring costs one empty claim.

- SQLite: the worker lives in the front end's process, so the bell is an ``asyncio.Event``.
- PostgreSQL: workers may be other processes on other hosts. ``announce`` sends
  ``NOTIFY ltxbot_jobs`` inside the transaction that queued the job, so PostgreSQL delivers it
  only once that job is committed, and never for one that rolled back. Each waiting process
  keeps one dedicated connection that ``LISTEN``s and reconnects whenever it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

log = logging.getLogger(__name__)

CHANNEL = "ltxbot_jobs"
# Shown in pg_stat_activity, so an operator can tell the bell's idle connection from a stuck one.
APPLICATION_NAME = "ltxbot-doorbell"


class Doorbell:
    """In-process doorbell (SQLite): rings only waiters in this process."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    async def announce(self, session: AsyncSession) -> None:
        """Called inside the transaction that made a job claimable."""
        self.ring()

    def ring(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        """Until rung or ``timeout`` seconds pass; True when rung. Each ring wakes one wait."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            rung = True
        except TimeoutError:
            rung = False
        # Cleared before the caller claims: a ring that arrives during the claim wakes the next wait.
        self._event.clear()
        return rung

    async def close(self) -> None:
        return None


class PostgresDoorbell(Doorbell):
    """LISTEN/NOTIFY doorbell: a job queued by any process on any host rings every waiting process."""

    def __init__(
        self, connect: Callable[[], Awaitable[Any]], *, keepalive_seconds: float = 30.0, retry_seconds: float = 1.0
    ) -> None:
        super().__init__()
        self._connect = connect
        self._keepalive = keepalive_seconds
        self._retry = retry_seconds
        self._listener: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def announce(self, session: AsyncSession) -> None:
        await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})

    async def wait(self, timeout: float) -> bool:
        self._start()
        return await super().wait(timeout)

    async def listening(self, timeout: float) -> bool:
        """Start listening if not yet; True once the LISTEN connection is up (within ``timeout``)."""
        self._start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _start(self) -> None:
        # Only a process that waits listens: a front end that only announces holds no extra connection.
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen_forever(), name="ltxbot-doorbell")

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.ring()

    async def _listen_forever(self) -> None:
        delay = self._retry
        while True:
            connection: Any = None
            try:
                connection = await asyncio.wait_for(self._connect(), self._keepalive)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._on_notify)
                self._connected.set()
                delay = self._retry
                # A job queued while nobody listened rang no bell: look for it now.
                self.ring()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), self._keepalive)
                    if not lost.is_set():
                        # A half-open socket (host gone, NAT dropped) shows only when something is sent.
                        await asyncio.wait_for(connection.execute("SELECT 1"), self._keepalive)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Whatever broke the listening connection, the remedy is a new one; the worker
                # keeps polling meanwhile. The exception's text may name the host: only its type.
                log.warning("job doorbell: lost its database connection (%s); reconnecting in %.0f s",
                            type(exc).__name__, delay)
            finally:
                self._connected.clear()
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def make_doorbell(engine: AsyncEngine) -> Doorbell:
    """The doorbell that suits the engine's database."""
    if engine.dialect.name != "postgresql":
        return Doorbell()
    _args, params = engine.dialect.create_connect_args(engine.url)
    # Options of SQLAlchemy's asyncpg adapter, not of asyncpg.connect.
    for key in ("async_creator_fn", "prepared_statement_cache_size", "prepared_statement_name_func"):
        params.pop(key, None)

    async def connect() -> Any:
        import asyncpg

        settings = {**params.get("server_settings", {}), "application_name": APPLICATION_NAME}
        return await asyncpg.connect(*_args, **{**params, "server_settings": settings})

    return PostgresDoorbell(connect)
