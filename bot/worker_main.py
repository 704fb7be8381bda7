"""``ltxbot worker [--gpu N]``: one worker bound to one GPU, without Discord, on any host.

It needs only the database URL and its model files. It registers itself (GPU, families,
library versions), claims what it can render, renews its lease while it renders, and ends
on SIGTERM/Ctrl-C (the running clip goes back to the queue, as with ``ltxbot run``) or
when an admin drains it (``/admin drain`` or ``ltxbot drain``), after its clip.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

from bot.worker import Worker, worker_name

if TYPE_CHECKING:
    from bot.config import Settings

log = logging.getLogger(__name__)


async def _serve(settings: Settings) -> None:
    from bot.db.migrate import upgrade
    from bot.db.store import JobStore

    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    worker = Worker(settings, store, standby=settings.generator.standby)
    task = asyncio.create_task(worker.run_forever(), name="ltxbot-worker")
    loop = asyncio.get_running_loop()

    def stop(name: str) -> None:
        log.info("%s: stopping; a running clip goes back to the queue", name)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
    log.info("worker %s started (families: %s; GPU: %s)", worker_name(settings), ", ".join(worker.claiming.families),
             "all visible" if settings.worker.gpu is None else settings.worker.gpu)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        await worker.close()
        await store.close()


def serve_worker(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    settings.data_path.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(settings))
    except KeyboardInterrupt:
        pass
    return 0
