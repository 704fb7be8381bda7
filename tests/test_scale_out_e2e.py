"""Scale-out end to end on a real PostgreSQL server: a Discord front end and ``ltxbot worker``
processes, each with its own data dir (two "hosts" sharing only the database URL), the real
generator on the tiny checkpoints, the loopback fake Discord."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.db.models import EndCode, JobStatus
from bot.processes import process_start_ticks
from tests.conftest import ROOT, clean_env, image_bytes
from tests.support.discord_harness import ADMIN, ALICE, BOB, Harness, bot_config, decode_mp4
from tests.support.fake_discord import FakeDiscord

pytestmark = pytest.mark.timeout(600)
LEASE_SECONDS = 3


class WorkerProcess:
    """``ltxbot worker`` with its own data dir and config, as on another machine."""

    def __init__(self, root: Path, name: str, tiny: Path, fake: FakeDiscord, db_url: str,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.data_dir = root / name / "data"
        self.data_dir.mkdir(parents=True)
        config = bot_config(self.data_dir, tiny, fake, database_url=db_url,
                            worker={"name": name, "lease_seconds": LEASE_SECONDS})
        self.config = root / name / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.env = {**clean_env(), "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "--config", str(self.config), "worker", cwd=str(self.config.parent),
            env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.log.append(raw.decode(errors="replace"))

    async def kill(self) -> None:
        """SIGKILL the worker alone, as a power cut or the OOM killer would."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
async def cluster(tmp_path: Path, tiny_models: Path, pg_url: str) -> AsyncIterator[Callable[..., Any]]:
    fake = FakeDiscord()
    await fake.start()
    workers: list[WorkerProcess] = []
    (tmp_path / "front").mkdir()
    harness = Harness(fake, tmp_path / "front", tiny_models, db_url=pg_url, run_args=("--no-worker",))

    def add_worker(name: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, name, tiny_models, fake, pg_url, env)
        workers.append(worker)
        return worker

    await harness.start_bot()
    yield lambda: (harness, add_worker)
    for worker in workers:
        await worker.close()
    await harness.close()
    await fake.stop()


async def _worker_id(harness: Harness, name: str) -> str:
    store = await harness.store()
    for _ in range(600):
        for row in await store.workers():
            if row.name == name:
                return row.id
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker {name} never registered")


async def test_a_clip_outlives_its_killed_worker_and_crosses_hosts(cluster: Callable[..., Any],
                                                                   tmp_path: Path) -> None:
    harness, add_worker = cluster()
    fake = harness.fake
    first = add_worker("host-a", {"LTXBOT_FAULT": "hang@stage_1", "LTXBOT_FAULT_ONCE": str(tmp_path / "once")})
    await first.start()
    a_id = await _worker_id(harness, "host-a")
    photo = image_bytes(size=(320, 240))
    interaction = await fake.slash(ALICE, "animate", {"prompt": "waves roll in"},
                                   attachment=fake.attachment(photo, "photo.png"))
    assert "queued" in await harness.answer_text(interaction)
    running = await harness.wait_job(1, lambda j: j.status == JobStatus.RUNNING and j.worker_id == a_id
                                     and j.generator_pid is not None and (j.progress or {}).get("stage") is not None,
                                     timeout=240)
    generator = (running.generator_pid, running.generator_start_ticks)
    await harness.wait_job(1, lambda j: (tmp_path / "once").exists(), timeout=120)  # stage 1 hangs now
    await first.kill()
    second = add_worker("host-b")
    await second.start()
    b_id = await _worker_id(harness, "host-b")
    posts = await harness.wait_clip_post(timeout=300)
    done = await harness.job(1)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 2
    assert [entry["code"] for entry in done.history or []] == [EndCode.INTERRUPTED]
    # The lost worker's generator ended with it (its lifeline), not with the lease.
    assert generator[0] is not None and process_start_ticks(generator[0]) != generator[1]
    clip = posts[0].files[0].data
    assert decode_mp4(clip) == (9, 64, 64)
    # The image reached host-b through the database; the clip reached the front end the same way.
    assert (second.data_dir / "uploads" / f"{done.input_sha256}.png").is_file()
    assert (harness.data_dir / "jobs" / "1" / "clip.mp4").read_bytes() == clip
    assert not (harness.data_dir / "jobs" / "1" / "spec.json").exists()  # rendered elsewhere
    workers = {w.id: w for w in await (await harness.store()).workers()}
    assert workers[b_id].clips_rendered == 1 and workers[a_id].clips_rendered == 0
    await asyncio.sleep(LEASE_SECONDS + 2)
    assert len(harness.clip_posts()) == 1
    assert not [line for line in second.log if "Traceback" in line or "could not serialize" in line]


async def test_every_clip_is_posted_once_across_a_front_end_restart(cluster: Callable[..., Any]) -> None:
    harness, add_worker = cluster()
    fake = harness.fake
    slow = {"LTXBOT_FAULT": "slow@stage_1", "LTXBOT_FAULT_SECONDS": "6"}
    workers = [add_worker("gpu0", slow), add_worker("gpu1", slow)]
    for worker in workers:
        await worker.start()
    ids = {await _worker_id(harness, w.name) for w in workers}
    for user, name in ((ALICE, "a.png"), (BOB, "b.png")):
        answer = await harness.answer_text(await fake.slash(user, "animate", {"prompt": "go"},
                                                             attachment=fake.attachment(image_bytes(), name)))
        assert "queued" in answer
    for job_id in (1, 2):
        await harness.wait_job(job_id, lambda j: j.status == JobStatus.RUNNING and j.worker_id in ids, timeout=240)
    assert {(await harness.job(1)).worker_id, (await harness.job(2)).worker_id} == ids  # one per worker
    queue = await harness.answer_text(await fake.slash(ALICE, "queue"))
    assert "on gpu0" in queue and "on gpu1" in queue, queue
    listing = await harness.answer_text(await fake.slash(ADMIN, "workers", group="admin"))
    assert "**gpu0**" in listing and "**gpu1**" in listing and listing.count("rendering job") == 2, listing
    refused = await harness.answer_text(await fake.slash(BOB, "workers", group="admin"))
    assert "Only the bot's admins" in refused
    await harness.kill_bot()
    for job_id in (1, 2):
        await harness.wait_job(job_id, lambda j: j.status == JobStatus.SUCCEEDED, timeout=300)
    await harness.start_bot()
    await harness.wait_clip_post(count=2, timeout=120)
    await asyncio.sleep(3)
    posts = harness.clip_posts()
    assert len(posts) == 2
    assert {(await harness.job(job_id)).posted_message_id for job_id in (1, 2)} == {p.message_id for p in posts}
    # An admin drains one worker: it ends by itself, the other keeps running.
    drained = await harness.answer_text(await fake.slash(ADMIN, "drain", {"worker": "gpu0"}, group="admin"))
    assert "Asked gpu0" in drained, drained
    assert workers[0].proc is not None and await asyncio.wait_for(workers[0].proc.wait(), 60) == 0
    assert workers[1].proc is not None and workers[1].proc.returncode is None
