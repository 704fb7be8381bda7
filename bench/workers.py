"""Throughput and exactly-once claims of 1, 2 and 4 ``ltxbot worker`` processes over one PostgreSQL queue.

    python -m bench.workers --out DIR [--jobs 40] [--workers 1 2 4] [--db-url postgresql+asyncpg://...]

Without ``--db-url`` it starts a throwaway PostgreSQL server (the test suite's own,
``tests/support/postgres.py``). Each round queues ``--jobs`` tiny clips (the tiny
checkpoints, CPU, 64x64, 9 frames, one stage of 2 steps) from four users at once, starts N workers,
each with its own data dir (hosts sharing only the database: images and clips travel
through it), and times from the workers' start to the last clip. It then checks that every
job succeeded in exactly one attempt with an empty history, and that the workers' own
clip counts add up to the number of jobs. Results: ``results.json`` and ``table.md``.

On a CPU this measures the queue's plumbing, not GPU scaling: every worker's generator
competes for the same cores (the machine's core count is in the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
USERS = 4


def _tiny_models(root: Path) -> dict[str, str]:
    subprocess.run([sys.executable, "-m", "generator.ltx2.tiny", str(root)], check=True, capture_output=True,
                   cwd=ROOT)
    return {
        "checkpoint": str(root / "ltx-2.3-tiny-dev.safetensors"),
        "distilled_checkpoint": str(root / "ltx-2.3-tiny-dev.safetensors"),
        "distilled_lora": str(root / "ltx-2.3-tiny-distilled-lora.safetensors"),
        "spatial_upsampler": str(root / "ltx-2.3-tiny-spatial-upscaler-x2.safetensors"),
        "gemma_root": str(root / "gemma"),
    }


def _config(data_dir: Path, db_url: str, models: dict[str, str], name: str) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir), "database_url": db_url, "log_level": "INFO", "models": models,
        "vae_tiling": {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16,
                       "temporal_overlap_frames": 8},
        "generation": {"frames": 9, "pipeline": "one_stage", "audio": False, "pixel_budget": 4096},
        "generator": {"device": "cpu", "fp8_cast": False, "timeout_base_seconds": 600},
        "worker": {"name": name, "lease_seconds": 30},
    }


def _spawn_worker(host: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "--config", str(host / "config.yaml"), "worker"],
                            cwd=host, env=env, stdout=subprocess.DEVNULL, stderr=(host / "worker.log").open("w"),
                            start_new_session=True)


async def _round(db_url: str, models: dict[str, str], work: Path, workers: int, jobs: int) -> dict[str, Any]:
    from PIL import Image

    from bot.config import load_settings
    from bot.db.migrate import upgrade
    from bot.db.models import JobStatus
    from bot.db.store import JobStore, NewJob
    from bot.intake.image import normalise_image
    from bot.shared_files import SharedFiles

    front = work / "front"
    front.mkdir(parents=True)
    (front / "config.yaml").write_text(yaml.safe_dump(_config(front / "data", db_url, models, "front")))
    settings = load_settings(front / "config.yaml")
    store = JobStore.from_url(db_url)
    await upgrade(store.engine)
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buffer, "PNG")
    image = normalise_image(buffer.getvalue(), lambda w, h: (64, 64), settings.uploads_dir, max_pixels=10**6)
    await SharedFiles(settings, store).publish_input(image.path, image.sha256)
    params = {"prompt": "waves", "width": 64, "height": 64, "frames": 9, "fps": 24, "seed": 1, "steps": 2,
              "pipeline": "one_stage", "audio": False, "image_strength": 1.0, "negative_prompt": None}
    ids = [(await store.create(NewJob(user_id=f"user{i % USERS}", prompt="waves", params=params,
                                      input_path=str(image.path), input_sha256=image.sha256))).id
           for i in range(jobs)]
    procs = []
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env["PYTHONPATH"] = str(ROOT)
    started = time.monotonic()
    for n in range(workers):
        host = work / f"host{n}"
        host.mkdir()
        (host / "config.yaml").write_text(yaml.safe_dump(_config(host / "data", db_url, models, f"host{n}")))
        procs.append(_spawn_worker(host, env))
    try:
        while True:
            done = [j for j in await store.history(None, page_size=jobs + 10) if j.status != JobStatus.QUEUED
                    and j.status != JobStatus.RUNNING]
            if len(done) == jobs:
                break
            await asyncio.sleep(0.5)
        seconds = time.monotonic() - started
        rows = [await store.get(job_id) for job_id in ids]
        records = [w for w in await store.workers() if w.name.startswith("host")]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
        await store.close()
    once = all(r is not None and r.status == JobStatus.SUCCEEDED and r.attempts == 1 and not r.history
               for r in rows)
    per_worker = {w.name: w.clips_rendered for w in records}
    return {
        "workers": workers, "jobs": jobs, "seconds": round(seconds, 1),
        "jobs_per_minute": round(jobs / seconds * 60, 2),
        "every_job_once": once and sum(per_worker.values()) == jobs,
        "clips_per_worker": per_worker,
        "start_order_users": [r.user_id for r in sorted((r for r in rows if r and r.started_at),
                                                        key=lambda r: r.started_at or 0)][:8],
    }


def _table(results: dict[str, Any]) -> str:
    lines = [f"# {results['jobs']} tiny jobs over one PostgreSQL queue ({results['machine']})", "",
             "| workers | seconds | jobs/min | every job once | clips per worker |", "|---|---|---|---|---|"]
    for r in results["rounds"]:
        lines.append(f"| {r['workers']} | {r['seconds']} | {r['jobs_per_minute']} | "
                     f"{'yes' if r['every_job_once'] else 'NO'} | {r['clips_per_worker']} |")
    return "\n".join(lines) + "\n"


async def _main(args: argparse.Namespace) -> int:
    server = None
    db_base = args.db_url
    if db_base is None:
        from tests.support.postgres import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            print("No PostgreSQL server binaries; run scripts/ensure-postgres.sh or pass --db-url.", file=sys.stderr)
            return 2
        server = PostgresServer(bindir)
        server.start()
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="ltxbot-workers-") as tmp:
            models = _tiny_models(Path(tmp) / "tiny")
            for n in args.workers:
                url = db_base if server is None else server.url(server.create_database())
                rounds.append(await _round(url, models, Path(tmp) / f"round{n}", n, args.jobs))
                print(json.dumps(rounds[-1]), flush=True)
    finally:
        if server is not None:
            server.stop()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU generators"
    results = {"machine": machine, "jobs": args.jobs, "rounds": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text(_table(results))
    return 0 if all(r["every_job_once"] for r in rounds) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--db-url", default=None, help="an empty PostgreSQL database (default: start one)")
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
