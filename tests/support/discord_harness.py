"""Start the real bot process against the fake Discord, and read what it did."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import yaml

from bot.db.models import Job
from bot.db.store import JobStore
from tests.conftest import ROOT, TINY_TILING, clean_env, tiny_model_settings
from tests.support.fake_discord import FakeDiscord, FakeUser, Recorded, snowflake

ALICE = FakeUser(snowflake(), "alice")
BOB = FakeUser(snowflake(), "bob")
CAROL = FakeUser(snowflake(), "carol")
ADMIN = FakeUser(snowflake(), "admin")
CHANNEL_POST = r"^/channels/\d+/messages$"


def bot_config(data_dir: Path, tiny: Path, fake: FakeDiscord, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "data_dir": str(data_dir),
        "log_level": "INFO",
        "models": tiny_model_settings(tiny),
        "vae_tiling": TINY_TILING,
        "generation": {"frames": 9, "pipeline": "two_stage", "steps": 2, "audio": False, "pixel_budget": 8192},
        "generator": {"device": "cpu", "fp8_cast": False, "kill_grace_seconds": 2, "timeout_base_seconds": 180},
        "limits": {"max_queued_per_user": 2, "daily_quota": 3, "cooldown_seconds": 0,
                   "max_image_pixels": 1_000_000},
        "discord": {"guilds": [int(fake.guild_id)], "admin_user_ids": [int(ADMIN.id)],
                    "cdn_hosts": ["127.0.0.1"], "allow_insecure_cdn": True, "progress_interval_seconds": 0.5,
                    "message_content_intent": True},
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


class Harness:
    def __init__(self, fake: FakeDiscord, root: Path, tiny: Path, *, env: dict[str, str] | None = None,
                 db_url: str | None = None, run_args: tuple[str, ...] = (), **overrides: Any) -> None:
        """``db_url``: a shared database (PostgreSQL) instead of the data dir's SQLite file;
        ``run_args``: extra arguments of ``ltxbot run`` (``--no-worker``)."""
        self.fake = fake
        self.db_url = db_url or f"sqlite+aiosqlite:///{root / 'data' / 'ltxbot.db'}"
        self.run_args = run_args
        if db_url is not None:
            overrides["database_url"] = db_url
        self.extra_env = env or {}
        self.root = root
        self.data_dir = root / "data"
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(bot_config(self.data_dir, tiny, fake, **overrides)))
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._store: JobStore | None = None

    async def start_bot(self) -> None:
        env = clean_env()
        env["DISCORD_TOKEN"] = "fake-token"
        env["PYTHONPATH"] = str(ROOT)
        env.update(self.extra_env)
        self.fake.identify = None
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "tests" / "support" / "fake_bot.py"), self.fake.url,
            "--config", str(self.config_path), "run", *self.run_args, cwd=str(self.root), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read_log(self.proc))
        try:
            await self.wait_log(r"ltxbot ready as", timeout=60)
        except TimeoutError:
            raise AssertionError("the bot did not become ready:\n" + "".join(self.log[-40:])) from None

    async def _read_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            self.log.append(raw.decode("utf-8", errors="replace"))

    async def wait_log(self, pattern: str, timeout: float = 60.0, since: int = 0) -> str:
        regex = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for line in self.log[since:]:
                if regex.search(line):
                    return line
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError("the bot exited:\n" + "".join(self.log[-40:]))
            await asyncio.sleep(0.05)
        raise TimeoutError(pattern)

    async def kill_bot(self) -> None:
        """SIGKILL the bot alone (not its generator): what a power cut or OOM kill does to it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def stop_bot(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def close(self) -> None:
        await self.stop_bot()
        # A generator the bot started must not outlive the test.
        for job in await (await self.store()).running():
            if job.generator_pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.generator_pid, signal.SIGKILL)
        if self._store is not None:
            await self._store.close()

    async def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore.from_url(self.db_url)
        return self._store

    async def jobs(self) -> list[Job]:
        return await (await self.store()).history(None, page_size=100)

    async def job(self, job_id: int) -> Job:
        job = await (await self.store()).get(job_id)
        assert job is not None
        return job

    async def wait_job(self, job_id: int, check: Callable[[Job], bool], timeout: float = 180.0) -> Job:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            job = await (await self.store()).get(job_id)
            if job is not None and check(job):
                return job
            await asyncio.sleep(0.2)
        raise AssertionError(f"job {job_id} did not reach the expected state; log:\n" + "".join(self.log[-30:]))

    # --- reading the fake's records ---------------------------------------------------

    def clip_posts(self) -> list[Recorded]:
        return [r for r in self.fake.find("POST", CHANNEL_POST) if r.files and r.status == 200]

    async def wait_clip_post(self, count: int = 1, timeout: float = 180.0) -> list[Recorded]:
        try:
            return list(await self.fake.wait_for(lambda: len(self.clip_posts()) >= count and self.clip_posts(),
                                                 timeout=timeout))
        except TimeoutError:
            raise AssertionError("no clip was posted; bot log:\n" + "".join(self.log[-40:])) from None

    async def answer_text(self, interaction: dict[str, Any], timeout: float = 30.0) -> str:
        """The text of the bot's first answer to an interaction, once it has one that is not 'thinking'."""
        def content() -> str | None:
            return self.fake.original_content(interaction) or None

        try:
            return str(await self.fake.wait_for(content, timeout=timeout))
        except TimeoutError:
            raise AssertionError("no answer; bot log:\n" + "".join(self.log[-40:])) from None

    def find_card(self, job_id: int) -> dict[str, Any] | None:
        for message in self.fake.bot_messages():
            if any(e.get("title", "").startswith(f"Job {job_id} ") for e in message["embeds"]):
                return message
        return None

    def card_for(self, job_id: int) -> dict[str, Any]:
        card = self.find_card(job_id)
        if card is None:
            raise AssertionError(f"no status card for job {job_id}")
        return card

    def card_titles(self, message_id: str) -> list[str]:
        """Every title a card had, from its creation and each edit of it."""
        titles = []
        for r in self.fake.requests:
            edit = r.path.endswith(f"/messages/{message_id}")
            if r.json and r.status == 200 and (r.message_id == message_id or edit):
                titles += [e.get("title", "") for e in r.json.get("embeds") or []]
        return titles


def decode_mp4(data: bytes) -> tuple[int, int, int]:
    """Frames, width and height of an mp4, by decoding every frame."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height
