"""Nothing outlives its supervisor: real ``ltxbot animate`` and generator processes, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.db.models import EndCode, JobStatus
from bot.db.store import JobStore, NewJob
from bot.processes import ProcessId, host_name, process_start_ticks
from bot.worker import Worker
from tests.conftest import ROOT, TINY_TILING, clean_env, image_bytes, tiny_model_settings

pytestmark = pytest.mark.slow


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: killpg(pgid, 0) also counts zombies nobody reaps."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


async def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(group_members(pid) for pid in pids):
            return True
        await asyncio.sleep(0.1)
    return False


def write_config(folder: Path, tiny_models: Path, name: str = "config.yaml", generator: str = "") -> None:
    models = "\n".join(f"  {k}: {v}" for k, v in tiny_model_settings(tiny_models).items())
    tiling = "\n".join(f"  {k}: {v}" for k, v in TINY_TILING.items())
    (folder / name).write_text(
        f"data_dir: data\nmodels:\n{models}\nvae_tiling:\n{tiling}\n"
        "generation:\n  frames: 9\n  steps: 2\n  audio: false\n"
        f"generator:\n  device: cpu\n  fp8_cast: false\n{generator}"
    )


def job_row(db: Path, job_id: int) -> dict[str, object] | None:
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        try:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        except sqlite3.OperationalError:  # not migrated yet
            return None
    return dict(row) if row is not None else None


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


async def test_a_killed_animate_takes_its_generator_along_and_the_next_animate_recovers_its_job(
    tmp_path: Path, tiny_models: Path, live_process: subprocess.Popen[bytes]
) -> None:
    write_config(tmp_path, tiny_models)
    write_config(tmp_path, tiny_models, "broken.yaml", f"  python: {tmp_path / 'no-such-python'}\n")
    (tmp_path / "photo.jpg").write_bytes(image_bytes("JPEG", (400, 300)))
    db = tmp_path / "data" / "ltxbot.db"
    # The generator hangs where stage_1 starts: the kill lands mid-render, at a known place.
    env = clean_env() | {"LTXBOT_FAULT": "hang@stage_1"}
    first = subprocess.Popen([sys.executable, "-m", "bot.cli", "animate", "photo.jpg", "waves", "--width", "128",
                              "--height", "128"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        generator = None
        for _ in range(1800):
            row = job_row(db, 1) if db.exists() else None
            if row and row["generator_pid"] and "image_encode" in str(row["phases"]):
                generator = int(str(row["generator_pid"]))
                break
            await asyncio.sleep(0.1)
        assert generator is not None, "the generator never got past image_encode"
        await asyncio.sleep(1.0)  # into stage_1, where it hangs
        assert group_members(generator)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert await gone_within([generator], 5), "the generator outlived ltxbot animate"
    # What the generator said up to the kill is on disk, down to where it stopped.
    log = (tmp_path / "data" / "jobs" / "1" / "generator.log").read_text()
    assert "=== job 1 attempt 1 ===" in log and "phase stage_1 started" in log

    # A job some live process (another bot) runs must be left to it.
    store = JobStore.from_url(f"sqlite+aiosqlite:///{db}")
    try:
        other = await store.create(NewJob(user_id="u", prompt="p", params={}, input_path="/x.png",
                                          input_sha256="0" * 64))
        live = ProcessId.of(live_process.pid)
        assert await store.claim_next(only_id=other.id, supervisor=live) is not None
        second = subprocess.run([sys.executable, "-m", "bot.cli", "--config", "broken.yaml", "animate", "photo.jpg",
                                 "again", "--width", "128", "--height", "128"], cwd=tmp_path, env=clean_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert "could not start its LTX-2 generator" in second.stderr
        recovered = await store.get(1)
        assert recovered is not None and recovered.status == JobStatus.QUEUED and recovered.attempts == 1
        assert [h["code"] for h in recovered.history or []] == [EndCode.INTERRUPTED]
        assert recovered.supervisor_pid is None and recovered.generator_pid is None
        untouched = await store.get(other.id)
        assert untouched is not None and untouched.status == JobStatus.RUNNING
        assert (untouched.supervisor_pid, untouched.attempts, untouched.history) == (live_process.pid, 1, [])
    finally:
        await store.close()


STANDBY_HOST = """
import asyncio, sys, time
from bot.config import load_settings
from bot.db.migrate import upgrade
from bot.db.store import JobStore
from bot.worker import Worker

async def main():
    settings = load_settings(None)
    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    worker = Worker(settings, store, standby=True)
    await worker.prepare_standby()
    print(worker._standby.pid, flush=True)
    time.sleep(600)

asyncio.run(main())
"""


async def test_a_standby_still_importing_ends_with_the_bot_that_started_it(tmp_path: Path, tiny_models: Path) -> None:
    write_config(tmp_path, tiny_models)
    host = subprocess.Popen([sys.executable, "-c", STANDBY_HOST], cwd=tmp_path, env=clean_env() | {
        "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        standby = int(host.stdout.readline())
        assert group_members(standby)  # still importing torch: it says "ready" only seconds later
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
        if host.stdout is not None:
            host.stdout.close()
    assert await gone_within([standby], 3), "the standby outlived the bot"


async def test_the_next_start_ends_a_standby_whose_bot_died(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    """Should a standby outlive its bot anyway (here: started without the parent-death tie), the next start ends it."""
    settings = make_settings()
    orphan = subprocess.Popen([sys.executable, "-m", "generator", "--standby"], cwd=ROOT, env=clean_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        dead_bot = subprocess.Popen(["true"])
        dead = ProcessId(host_name(), dead_bot.pid, process_start_ticks(dead_bot.pid))
        dead_bot.wait()
        await store.record_standby(dead, ProcessId.of(orphan.pid))
        await Worker(settings, store).recover()
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert await store.take_orphaned_standbys() == []
    finally:
        if orphan.poll() is None:
            os.killpg(orphan.pid, signal.SIGKILL)
            orphan.wait()
        if orphan.stdin is not None:
            orphan.stdin.close()
