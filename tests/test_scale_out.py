"""Scale-out in the store, on both databases: leases, capabilities, worker records, shared files, GPU time."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bot.access import Refusal, check_usage
from bot.config import Limits, Settings
from bot.db.models import EndCode, JobStatus, WorkerState
from bot.db.store import ClaimingWorker, JobStore, NewJob, WorkerInfo, clip_key, input_key
from bot.shared_files import SharedFiles
from bot.worker import Worker
from tests.conftest import ROOT, clean_env, image_bytes


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def new_job(user: str = "u1", family: str = "ltx2", **extra: object) -> NewJob:
    return NewJob(user_id=user, prompt="waves", params={"frames": 9, "family": family}, input_path="/x.png",
                  input_sha256="0" * 64, **extra)  # type: ignore[arg-type]


def worker(name: str, *families: str, lease: float = 60.0, budget: float | None = None) -> ClaimingWorker:
    return ClaimingWorker(id=name, families=families or ("ltx2",), lease_seconds=lease, vram_budget_gib=budget)


async def test_an_expired_lease_goes_to_another_worker_and_fences_the_lost_one(store: JobStore) -> None:
    job = await store.create(new_job())
    lost = await store.claim_next(worker=worker("a", lease=0.3))
    assert lost is not None and lost.worker_id == "a" and lost.lease_until is not None
    assert await store.recover_expired(max_attempts=3) == []  # the lease still holds
    await asyncio.sleep(0.5)
    taken = await store.recover_expired(max_attempts=3)
    assert [j.id for j in taken] == [job.id]
    back = await store.get(job.id)
    assert back is not None and back.status == JobStatus.QUEUED and back.worker_id is None
    assert back.history and back.history[-1]["code"] == EndCode.INTERRUPTED
    again = await store.claim_next(worker=worker("b"))
    assert again is not None and again.id == job.id and again.attempts == 2 and again.worker_id == "b"
    # The lost worker's late writes change nothing, and it learns it lost the job.
    assert not await store.renew_lease(job.id, 1, "a", 60)
    assert not await store.finish(job.id, 1, output_path="/late.mp4", output_bytes=1, phases=[])
    assert await store.renew_lease(job.id, 2, "b", 60)
    assert await store.finish(job.id, 2, output_path="/c.mp4", output_bytes=1, phases=[])
    assert await store.recover_expired(max_attempts=3) == []


async def test_a_lease_out_of_attempts_fails_the_job(store: JobStore) -> None:
    job = await store.create(new_job())
    await store.claim_next(worker=worker("a", lease=0.2))
    await asyncio.sleep(0.4)
    await store.recover_expired(max_attempts=1)
    failed = await store.get(job.id)
    assert failed is not None and failed.status == JobStatus.FAILED and "stopped answering" in (
        failed.error_message or "")


async def test_a_worker_claims_only_its_families_and_what_fits_its_budget(store: JobStore) -> None:
    ltxv = await store.create(new_job(family="ltxv"))
    big = await store.create(new_job(predicted_peak_gib=30.0))
    small = await store.create(new_job("u2", predicted_peak_gib=7.5))
    unknown = await store.create(new_job("u3"))
    card_16 = worker("a", "ltx2", budget=16.0)
    claimed = [await store.claim_next(worker=card_16) for _ in range(3)]
    assert [j.id if j else None for j in claimed] == [small.id, unknown.id, None]
    assert (await store.get(ltxv.id)).status == JobStatus.QUEUED  # type: ignore[union-attr]
    both = await store.claim_next(worker=worker("b", "ltx2", "ltxv"))
    last = await store.claim_next(worker=worker("b", "ltx2", "ltxv"))
    assert {both.id, last.id} == {ltxv.id, big.id}  # type: ignore[union-attr]


async def test_gpu_time_counts_every_attempt_and_feeds_the_daily_budget(store: JobStore) -> None:
    job = await store.create(new_job())
    await store.claim_next()
    await store.record_phases(job.id, 1, [{"name": "stage_1", "seconds": 50.0}])
    await store.fail(job.id, 1, code=EndCode.CRASHED, message="boom", retry=True, max_attempts=3)
    claimed = await store.claim_next()
    assert claimed is not None and claimed.phases is None  # a new attempt starts with no phases
    await store.finish(job.id, 2, output_path="/c.mp4", output_bytes=1,
                       phases=[{"name": "stage_1", "seconds": 60.0}, {"name": "decode", "seconds": 10.5}])
    done = await store.get(job.id)
    assert done is not None and done.gpu_seconds == pytest.approx(120.5)
    usage = await store.usage("u1")
    assert usage.gpu_seconds_last_day == pytest.approx(120.5)
    check_usage(Limits(daily_gpu_seconds=121, daily_quota=0, cooldown_seconds=0), usage)
    with pytest.raises(Refusal, match="GPU minutes"):
        check_usage(Limits(daily_gpu_seconds=120, daily_quota=0, cooldown_seconds=0), usage)


async def test_workers_register_beat_and_drain(store: JobStore) -> None:
    info = WorkerInfo(id="w1", name="box:gpu0", host="box", pid=1, gpu=0, gpu_name="H200", vram_budget_gib=None,
                      families=["ltx2"], libraries={"torch": "2"})
    await store.register_worker(info)
    assert not await store.worker_heartbeat("w1", WorkerState.RENDERING, 7)
    assert not await store.worker_heartbeat("w1", WorkerState.IDLE, rendered=1)
    assert [w.name for w in await store.request_drain("box:gpu0")] == ["box:gpu0"]
    assert await store.worker_heartbeat("w1", WorkerState.IDLE)
    (row,) = await store.workers()
    assert row.state == WorkerState.DRAINING and row.clips_rendered == 1 and row.gpu_name == "H200"
    await store.worker_heartbeat("w1", WorkerState.STOPPED)
    assert await store.request_drain("box:gpu0") == []  # a stopped worker is not asked again
    assert await store.request_drain("nobody") == []


async def test_a_drained_worker_ends_its_loop(tmp_path: Path, db_url: str, store: JobStore) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, generator={"standby": False})
    runner = Worker(settings, store)
    loop = asyncio.create_task(runner.run_forever())
    for _ in range(100):
        if [w for w in await store.workers() if w.id == runner.claiming.id]:
            break
        await asyncio.sleep(0.05)
    await store.request_drain(runner.claiming.id)
    await asyncio.wait_for(loop, 20)  # returns by itself, no cancel
    (row,) = await store.workers()
    assert row.state == WorkerState.STOPPED


async def test_files_travel_through_the_database_and_go_when_done(tmp_path: Path, db_url: str,
                                                                  store: JobStore) -> None:
    front = Settings(data_dir=tmp_path / "front", database_url=db_url, share_files="database")
    far = Settings(data_dir=tmp_path / "far", database_url=db_url, share_files="database")
    image = front.uploads_dir / ("a" * 64 + ".png")
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png bytes")
    import hashlib

    sha = hashlib.sha256(b"png bytes").hexdigest()
    await SharedFiles(front, store).publish_input(image, sha)
    job = await store.create(NewJob(user_id="u1", prompt="p", params={}, input_path=str(image), input_sha256=sha))
    fetched = await SharedFiles(far, store).input_for(job)
    assert fetched.is_relative_to(far.uploads_dir) and fetched.read_bytes() == b"png bytes"
    # An end image travels the same way, by its content name.
    end_sha = hashlib.sha256(b"end bytes").hexdigest()
    (front.uploads_dir / f"{end_sha}.png").write_bytes(b"end bytes")
    await SharedFiles(front, store).publish_upload(f"{end_sha}.png")
    await SharedFiles(far, store).ensure_upload(f"{end_sha}.png")
    assert (far.uploads_dir / f"{end_sha}.png").read_bytes() == b"end bytes"
    with pytest.raises(ValueError):
        await SharedFiles(far, store).ensure_upload("../escape.png")
    clip = far.jobs_dir / str(job.id) / "clip.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"mp4 bytes")
    await SharedFiles(far, store).publish_clip(job.id, clip)
    job.output_path = str(clip)  # the worker's own path: not under the front end's data dir
    posted = await SharedFiles(front, store).clip_for(job)
    assert posted is not None and posted.is_relative_to(front.jobs_dir) and posted.read_bytes() == b"mp4 bytes"
    await store.mark_delivered(job.id, "1", "u")
    assert not await store.has_blob(clip_key(job.id))
    await store.purge_user("u1")
    assert not await store.has_blob(input_key(sha))
    # On one machine nothing is copied.
    local = Settings(data_dir=tmp_path / "front", database_url=db_url, share_files="local")
    assert not SharedFiles(local, store).enabled


async def test_cli_lists_and_drains_workers(tmp_path: Path) -> None:
    from tests.test_cli import ltxbot

    db = tmp_path / "data" / "ltxbot.db"
    store = JobStore.from_url(f"sqlite+aiosqlite:///{db}")
    from bot.db.migrate import upgrade

    await upgrade(store.engine)
    await store.register_worker(WorkerInfo(id="abcdef0123", name="box:gpu1", host="box", pid=1, gpu=1,
                                           gpu_name="RTX 4090", vram_budget_gib=None, families=["ltx2"],
                                           libraries={}))
    (tmp_path / "config.yaml").write_text(f"data_dir: {tmp_path / 'data'}\n")
    listed = await asyncio.to_thread(ltxbot, "workers", cwd=tmp_path)
    assert listed.returncode == 0 and "box:gpu1" in listed.stdout and "RTX 4090" in listed.stdout
    missing = await asyncio.to_thread(ltxbot, "drain", "nope", cwd=tmp_path)
    assert missing.returncode == 1 and "ltxbot workers" in missing.stderr
    drained = await asyncio.to_thread(ltxbot, "drain", "box:gpu1", cwd=tmp_path)
    assert drained.returncode == 0
    assert await store.worker_heartbeat("abcdef0123", WorkerState.IDLE)
    await store.close()


async def test_the_same_image_published_at_once_by_many_requests(store: JobStore) -> None:
    await asyncio.gather(*(store.put_blob(input_key("f" * 64), b"same", "f" * 64) for _ in range(8)))
    assert await store.get_blob(input_key("f" * 64)) == (b"same", "f" * 64)
    await store.put_blob(clip_key(1), b"old", "a")
    await store.put_blob(clip_key(1), b"new", "b")  # a later attempt's clip replaces the earlier one
    assert await store.get_blob(clip_key(1)) == (b"new", "b")


def test_a_job_records_the_least_vram_it_can_run_in() -> None:
    from bot.intake.request import least_vram
    from generator.protocol import GenerationRequest

    settings = Settings()

    def need(width: int, height: int) -> float | None:
        request = GenerationRequest(prompt="p", width=width, height=height, frames=97, seed=1)
        return least_vram(settings, request)

    small, large = need(1024, 768), need(2048, 1536)
    assert small is not None and large is not None
    # Streaming brings 1024x768x97 under an 8 GiB card; 2048x1536's decode alone does not fit one.
    assert small < 8.0 < large
    assert least_vram(settings, GenerationRequest(prompt="p", family="ltxv", width=768, height=512, frames=97,
                                                  seed=1, audio=False)) is None  # no fitted model: any worker


async def test_a_drafts_kept_latents_reach_a_finalize_on_another_host(tmp_path: Path, db_url: str,
                                                                      store: JobStore) -> None:
    from bot.db.store import draft_key
    from bot.drafts import delete_kept
    from bot.worker import draft_state_path

    here = Settings(data_dir=tmp_path / "a", database_url=db_url, share_files="database")
    there = Settings(data_dir=tmp_path / "b", database_url=db_url, share_files="database")
    kept = draft_state_path(here, 7)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"latents")
    await SharedFiles(here, store).publish_draft(7, kept)
    assert await SharedFiles(there, store).has_draft(7, draft_state_path(there, 7))
    await SharedFiles(there, store).draft_here(7, draft_state_path(there, 7))
    assert draft_state_path(there, 7).read_bytes() == b"latents"
    await delete_kept(here, store, [7])
    assert not await store.has_blob(draft_key(7)) and not kept.exists()


async def test_a_queued_job_no_live_worker_can_render_fails_clearly_after_the_grace(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    settings = make_settings(worker={"unserved_grace_seconds": 0}, generator={"vram_budget_gib": 8})
    other_family = await store.create(new_job(family="ltxv"))
    too_big = await store.create(new_job(predicted_peak_gib=30.0))
    fits = await store.create(new_job(predicted_peak_gib=6.0))
    await store.register_worker(WorkerInfo(id="w2", name="box:gpu1", host="box", pid=1, gpu=1, gpu_name=None,
                                           vram_budget_gib=None, families=["ltxv"], libraries={}))
    patient = Worker(make_settings(generator={"vram_budget_gib": 8}), store)
    await patient.refuse_unservable()  # the default grace: nothing has waited a minute yet
    worker_here = Worker(settings, store)
    await worker_here.refuse_unservable()
    states = {j: (await store.get(j)) for j in (other_family.id, too_big.id, fits.id)}
    assert states[other_family.id].status == JobStatus.QUEUED  # type: ignore[union-attr]  # w2 renders LTX-Video
    assert states[fits.id].status == JobStatus.QUEUED  # type: ignore[union-attr]
    refused = states[too_big.id]
    assert refused is not None and refused.status == JobStatus.FAILED and refused.error_code == EndCode.INVALID
    assert "needs about 30.0 GiB" in (refused.error_message or "")

    await store.worker_heartbeat("w2", WorkerState.STOPPED)
    await worker_here.refuse_unservable()
    gone = await store.get(other_family.id)
    assert gone is not None and gone.status == JobStatus.FAILED
    assert "LTX-Video model family is not enabled" in (gone.error_message or "")
    assert (await store.get(fits.id)).status == JobStatus.QUEUED  # type: ignore[union-attr]


async def test_a_delivered_clip_becomes_an_upload_another_host_can_fetch(
    make_settings: Callable[..., Settings], store: JobStore, tmp_path: Path
) -> None:
    front = SharedFiles(make_settings(share_files="database"), store)
    job = await store.create(new_job())
    clip = front.settings.jobs_dir / str(job.id) / "clip.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"not really an mp4")
    job.output_path = str(clip)
    name = await front.clip_as_upload(job)
    assert name is not None and name.endswith(".mp4")
    assert (front.settings.uploads_dir / name).read_bytes() == b"not really an mp4"
    await front.publish_upload(name)
    remote = SharedFiles(make_settings(share_files="database", data_dir=str(tmp_path / "remote")), store)
    await remote.ensure_upload(name)
    assert (remote.settings.uploads_dir / name).read_bytes() == b"not really an mp4"
    clip.unlink()
    front.enabled = False
    assert await front.clip_as_upload(job) is None


class TerminalAnimate:
    """``ltxbot animate --no-worker`` in its own process and data dir, as an owner runs it on any host."""

    def __init__(self, root: Path, db_url: str, **config: object) -> None:
        root.mkdir(parents=True)
        (root / "photo.png").write_bytes(image_bytes())
        (root / "config.yaml").write_text(yaml.safe_dump({"data_dir": str(root / "data"), "database_url": db_url,
                                                          **config}))
        self.root = root
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr: list[str] = []

    async def start(self, *extra: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "animate", "photo.png", "waves roll in", "--width", "128",
            "--height", "128", "--frames", "9", "--no-worker", *extra, cwd=self.root,
            env={**clean_env(), "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )

    async def line_with(self, text: str) -> str:
        """Read stderr until a line holds ``text``; that line."""
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stderr.readline(), 60)
            assert raw, f"ltxbot animate ended before saying {text!r}: {''.join(self.stderr)}"
            self.stderr.append(raw.decode())
            if text in self.stderr[-1]:
                return self.stderr[-1]

    async def end(self) -> tuple[int, str, str]:
        """Its exit status, stdout and the rest of stderr."""
        assert self.proc is not None
        out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), "".join(self.stderr) + err.decode()


async def test_animate_no_worker_notes_only_when_no_worker_is_live(tmp_path: Path, db_url: str,
                                                                   store: JobStore) -> None:
    """Only a worker refuses what no worker can render: with none live, the clip would wait unseen."""
    await store.register_worker(WorkerInfo(id="w1", name="box:gpu0", host="box", pid=1, gpu=0, gpu_name=None,
                                           vram_budget_gib=None, families=["ltx2"], libraries={}))
    await store.worker_heartbeat("w1", WorkerState.STOPPED)
    alone = TerminalAnimate(tmp_path / "alone", db_url)
    await alone.start()
    note = await alone.line_with("No worker is running")
    assert "waits in the queue" in note and "ltxbot worker" in note
    assert (await store.get(1)).status == JobStatus.QUEUED  # type: ignore[union-attr]  # still queued, waiting
    assert alone.proc is not None
    alone.proc.kill()
    await alone.end()

    await store.register_worker(WorkerInfo(id="w1", name="box:gpu0", host="box", pid=1, gpu=0, gpu_name=None,
                                           vram_budget_gib=None, families=["ltx2"], libraries={}))  # it restarts
    served = TerminalAnimate(tmp_path / "served", db_url)
    await served.start()
    await served.line_with("Job 2:")
    claimed = None
    while claimed is None:  # the worker takes it, then its job ends
        claimed = await store.claim_next(only_id=2, worker=worker("w1"))
        await asyncio.sleep(0.1)
    assert await store.mark_cancelled(claimed.id, claimed.attempts)
    code, _, err = await served.end()
    assert code == 1 and "Job 2 cancelled" in err and "No worker is running" not in err


async def test_animate_no_worker_says_none_runs_and_ctrl_c_cancels_the_queued_job(
    tmp_path: Path, db_url: str, store: JobStore
) -> None:
    """No worker runs, so the clip would wait unseen; Ctrl-C must not leave it for a worker that starts later."""
    await store.register_worker(WorkerInfo(id="gone", name="box:gpu0", host="box", pid=1, gpu=0, gpu_name=None,
                                           vram_budget_gib=None, families=["ltx2"], libraries={}))
    await store.worker_heartbeat("gone", WorkerState.STOPPED)  # registered once, stopped since
    terminal = TerminalAnimate(tmp_path / "terminal", db_url)
    await terminal.start()
    assert "Job 1:" in await terminal.line_with("Job 1:")
    note = await terminal.line_with("No worker is running")
    assert "waits in the queue" in note and "ltxbot worker" in note
    assert terminal.proc is not None
    terminal.proc.send_signal(signal.SIGINT)
    code, out, err = await terminal.end()
    assert code == 130 and out == "" and "Traceback" not in err
    assert "Job 1 cancelled before it started." in err
    job = await store.get(1)
    assert job is not None and job.status == JobStatus.CANCELLED and job.attempts == 0


async def test_animate_no_worker_is_quiet_with_a_live_worker_and_ctrl_c_stops_its_render(
    tmp_path: Path, db_url: str, store: JobStore
) -> None:
    """A live worker has the job: Ctrl-C asks it to stop, the cancel a Discord user's /cancel gets."""
    await store.register_worker(WorkerInfo(id="w1", name="box:gpu0", host="box", pid=1, gpu=0, gpu_name=None,
                                           vram_budget_gib=None, families=["ltx2"], libraries={}))
    terminal = TerminalAnimate(tmp_path / "terminal", db_url)
    await terminal.start()
    await terminal.line_with("Job 1:")
    claimed = None
    while claimed is None:
        claimed = await store.claim_next(worker=worker("w1"))
        await asyncio.sleep(0.1)
    assert terminal.proc is not None
    terminal.proc.send_signal(signal.SIGINT)
    code, _, err = await terminal.end()
    assert code == 130 and "No worker is running" not in err
    assert "Job 1 cancelled: its worker stops the render." in err
    assert await store.cancel_requested(claimed.id)


@pytest.mark.parametrize("db_backend", ["postgresql"])  # where clips travel through the database
async def test_a_terminal_jobs_clip_leaves_the_database_once_written_out(
    tmp_path: Path, db_url: str, store: JobStore
) -> None:
    """The front end drops a clip's shared copy once posted; a terminal job is never posted, so the
    terminal drops it once the clip is in ``--out``."""
    terminal = TerminalAnimate(tmp_path / "terminal", db_url, share_files="database")
    await terminal.start("--out", "clip.mp4")
    await terminal.line_with("Job 1:")
    far = Settings(data_dir=tmp_path / "far", database_url=db_url, share_files="database")
    job = None
    while job is None:  # this test is the worker on another host
        job = await store.claim_next(worker=worker("far"))
        await asyncio.sleep(0.1)
    clip = far.jobs_dir / str(job.id) / "clip.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"rendered far away")
    await SharedFiles(far, store).publish_clip(job.id, clip)
    assert await store.finish(job.id, job.attempts, output_path=str(clip), output_bytes=17, phases=[])
    code, out, err = await terminal.end()
    assert code == 0, err
    assert out == "clip.mp4\n" and (terminal.root / "clip.mp4").read_bytes() == b"rendered far away"
    assert not await store.has_blob(clip_key(job.id))
