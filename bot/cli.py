"""The ``ltxbot`` command: run the bot, manage the database, inspect jobs, render locally."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import ConfigError, LtxvSettings, Settings, ensure_config_file, load_settings
from generator.protocol import PIPELINE_KINDS

if TYPE_CHECKING:
    from bot.db.models import Job
    from bot.db.store import JobStore

DEFAULT_CONFIG = Path("config.yaml")
EXIT_USAGE = 2


CONFIG_HELP = "config file (default: ./config.yaml)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltxbot", description="Animate still images with LTX-2 on your own GPU.")
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    # Every subcommand takes --config too (`ltxbot run --config c.yaml`). SUPPRESS keeps a subcommand
    # that was not given one from overwriting the top-level value with its own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, parents=[common])

    run = command("run", "run the Discord bot (applies migrations first)")
    run.add_argument("--no-worker", action="store_true",
                     help="the Discord front end alone: `ltxbot worker` processes render, here or on other hosts")
    worker = command("worker", "render queued jobs on one GPU, without Discord (one per GPU, on any host)")
    worker.add_argument("--gpu", type=int, default=None, help="the GPU index this worker uses (default: worker.gpu)")
    worker.add_argument("--name", default=None, help="how /admin workers shows it (default: host name and GPU)")
    command("workers", "the registered workers, their GPUs, state and last heartbeat")
    drain = command("drain", "let a worker finish its clip and stop taking new ones")
    drain.add_argument("worker", help="the worker's name (as `ltxbot workers` shows it) or id")
    db = command("db", "database maintenance")
    db.add_argument("action", choices=["upgrade"])
    jobs = command("jobs", "job history, newest first")
    jobs.add_argument("--user", default=None, help="only this user's jobs (Discord id, or 'local')")
    jobs.add_argument("--page", type=int, default=1)
    jobs.add_argument("--json", action="store_true", help="print the page as JSON, for scripts")
    job = command("job", "one job in detail")
    job.add_argument("job_id", type=int)
    job.add_argument("--json", action="store_true", help="print every stored field as JSON, for scripts")
    cfg = command("config", "configuration")
    cfg.add_argument("action", choices=["check", "needs-ltxv-venv"],
                     help="check: validate; needs-ltxv-venv: exit 0 when LTX-Video is enabled with the default venv")
    cfg.add_argument("path", nargs="?", type=Path, default=None)
    intake = command("intake", "normalise one image as the bot would; prints JSON")
    intake.add_argument("image", type=Path)
    intake.add_argument("--width", type=int)
    intake.add_argument("--height", type=int)
    intake.add_argument("--out", type=Path, default=None, help="folder for the result (default: <data>/uploads)")
    animate = command("animate", "render one clip locally, through the same queue and generator")
    animate.add_argument("image", type=Path)
    animate.add_argument("prompt")
    animate.add_argument("--frames", type=int)
    animate.add_argument("--seconds", type=float)
    animate.add_argument("--width", type=int)
    animate.add_argument("--height", type=int)
    animate.add_argument("--seed", type=int)
    animate.add_argument("--pipeline", choices=list(PIPELINE_KINDS))
    animate.add_argument("--end-image", type=Path, default=None, help="an image for the last frame")
    animate.add_argument("--loop", action="store_true", help="end on the first image, so the clip loops")
    animate.add_argument("--lora", default=None, help="a LoRA by its name under loras in the config")
    animate.add_argument("--lora-strength", type=float, default=None, help="its strength (default: the config's)")
    animate.add_argument("--model", choices=["ltx2", "ltxv"], help="model family (default: generation.family)")
    animate.add_argument("--no-audio", action="store_true")
    animate.add_argument("--audio", type=Path, default=None,
                         help="lip-sync to this track (MP3, WAV, M4A, OGG); the clip is as long as the track")
    animate.add_argument("--out", type=Path, default=None, help="copy the clip here (default: print its path)")
    animate.add_argument("--no-worker", action="store_true",
                         help="only queue the job and wait: running `ltxbot worker` processes render it")
    animate.add_argument("--draft", action="store_true",
                         help="render a half-size draft (stage 1) only; `ltxbot finalize JOB` renders the rest")
    animate.add_argument("--preview-dir", type=Path, default=None,
                         help="write a PNG of stage 1's current estimate here every few seconds")
    finalize = command("finalize", "render the full clip of a draft from its kept latents")
    finalize.add_argument("job_id", type=int, help="the draft's job id")
    finalize.add_argument("--out", type=Path, default=None, help="copy the clip here (default: print its path)")
    models = command("models", "model files")
    models.add_argument("action", choices=["tiny", "tiny-ltxv"],
                        help="write tiny random-weight LTX-2 (tiny) or LTX-Video (tiny-ltxv) files for smoke tests")
    models.add_argument("dir", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace, *, create: bool = False) -> Settings:
    path: Path = args.config or DEFAULT_CONFIG
    if create and args.config is None and ensure_config_file(path):
        print(f"Created {path} from config.example.yaml; edit it to point at your model files.", file=sys.stderr)
    return load_settings(path if path.exists() or args.config else None)


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "config" and args.action == "needs-ltxv-venv":
        path = args.path or args.config or DEFAULT_CONFIG
        settings = load_settings(path if path.exists() else None)
        default = Path(settings.interpreter("ltxv")) == (Path.cwd() / LtxvSettings().python)
        return 0 if settings.ltxv.enabled and default else 1
    if command == "config":
        settings = load_settings(args.path or args.config or DEFAULT_CONFIG)
        print(f"OK: configuration is valid (data dir: {settings.data_path}).")
        return 0
    if command == "models" and args.action == "tiny-ltxv":
        return _tiny_ltxv(_settings(args), args.dir.resolve())
    if command == "models":
        return _tiny_ltx2(_settings(args), args.dir.resolve())
    if command == "run":
        from bot.app import run_bot

        return run_bot(_settings(args, create=True), run_worker=not args.no_worker)
    settings = _settings(args)
    if command == "worker":
        from bot.worker_main import serve_worker

        worker = settings.worker.model_copy(update={
            key: value for key, value in (("gpu", args.gpu), ("name", args.name)) if value is not None
        })
        return serve_worker(settings.model_copy(update={"worker": worker}))
    if command == "intake":
        return _intake(settings, args)
    return asyncio.run(_with_store(settings, args))


async def _open_store(settings: Settings) -> JobStore:
    from bot.db.migrate import upgrade
    from bot.db.store import JobStore

    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    return store


async def _with_store(settings: Settings, args: argparse.Namespace) -> int:
    store = await _open_store(settings)
    try:
        if args.command == "db":
            print(f"Database is at the newest schema ({_shown_url(settings.db_url)}).")
            return 0
        if args.command == "jobs":
            _print_jobs(await store.history(args.user, args.page, page_size=20), as_json=args.json)
            return 0
        if args.command == "job":
            job = await store.get(args.job_id)
            if job is None:
                print(f"No job {args.job_id}.", file=sys.stderr)
                return 1
            from bot.db.models import JobStatus

            position = await store.queue_position(job.id) if job.status == JobStatus.QUEUED else None
            if args.json:
                details = job_details(job)
                details["predicted_phases"] = predicted_phases(settings, job)
                if position is not None:
                    details["queue_position"] = position
                print(json.dumps(details, indent=2, default=str))
            else:
                from bot.terminal import job_view, make_console

                make_console().print(job_view(job, position, predicted_phases(settings, job)))
            return 0
        if args.command == "workers":
            from bot.terminal import make_console, workers_table

            make_console().print(workers_table(await store.workers()))
            return 0
        if args.command == "drain":
            asked = await store.request_drain(args.worker)
            if not asked:
                print(f"No running worker is called {args.worker!r}; `ltxbot workers` lists them.", file=sys.stderr)
                return 1
            print(f"Asked {len(asked)} worker(s) to finish their clip and stop.")
            return 0
        if args.command == "animate":
            from bot.local import animate

            return await animate(settings, store, args)
        if args.command == "finalize":
            from bot.local import finalize

            return await finalize(settings, store, args)
    finally:
        await store.close()
    return EXIT_USAGE


def _print_jobs(jobs: list[Job], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([job_details(job) for job in jobs], indent=2, default=str))
        return
    if not jobs:
        print("No jobs yet.")
        return
    from bot.terminal import jobs_table, make_console

    console = make_console()
    console.print(jobs_table(jobs, console.width))


def predicted_phases(settings: Settings, job: Job) -> dict[str, float] | None:
    """Each phase's predicted peak under the configured budget (``generator/predict.py``), for ``ltxbot job``."""
    from generator.predict import predict
    from generator.protocol import GenerationRequest

    try:
        request = GenerationRequest.model_validate(job.params)
    except ValueError:
        return None
    budget = settings.generator.vram_budget_gib
    found = predict(request.family, request.pipeline, request.width, request.height, request.frames,
                    request.audio, budget if isinstance(budget, int | float) else None,
                    guidance_batch=settings.generator.guidance_batch)
    return None if found is None else found.phases


def job_details(job: Job) -> dict[str, Any]:
    keys = (
        "id", "user_id", "guild_id", "channel_id", "status", "attempts", "prompt", "negative_prompt", "params",
        "input_sha256", "created_at", "started_at", "finished_at", "error_code", "error_message", "output_path",
        "output_bytes", "posted_message_url", "progress", "phases", "history", "draft", "draft_of", "draft_kept_until",
    )
    return {key: getattr(job, key) for key in keys}


def _run_writer(python: str, module: str, root: Path) -> str | None:
    """Run a tiny-model writer in a generator interpreter: torch never enters the bot's own process."""
    import subprocess

    package_root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([python, "-m", module, str(root)], capture_output=True, text=True,
                          cwd=package_root, check=False)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    return done.stdout


def _tiny_ltx2(settings: Settings, root: Path) -> int:
    python = settings.interpreter("ltx2")
    if not Path(python).exists():
        print(f"No generator interpreter at {python}; check generator.python.", file=sys.stderr)
        return 1
    lines = _run_writer(python, "generator.ltx2.tiny", root)
    if lines is None:
        return 1
    print("# Tiny random-weight models for smoke tests; they render noise. Put these lines in config.yaml:")
    print(lines.strip())
    print("generator:\n  device: cpu\n  fp8_cast: false")
    return 0


def _tiny_ltxv(settings: Settings, root: Path) -> int:
    """The tiny LTX-Video files are written by the LTX-Video interpreter, with that package's classes."""
    python = settings.interpreter("ltxv")
    if not Path(python).exists():
        print(f"No LTX-Video interpreter at {settings.ltxv.python}; run `make ltxv` first.", file=sys.stderr)
        return 1
    output = _run_writer(python, "generator.ltxv.tiny", root)
    if output is None:
        return 1
    files = json.loads(output.strip().splitlines()[-1])
    print("# Tiny random-weight LTX-Video files for smoke tests; they render noise. Put these lines in config.yaml:")
    print("ltxv:\n  enabled: true")
    for key, value in files.items():
        print(f"  {key}: {value}")
    print("generator:\n  device: cpu")
    return 0


def _intake(settings: Settings, args: argparse.Namespace) -> int:
    """One JSON line, exit 0 or 2, whatever the image does: the decoder's own limits, then a last resort."""
    from bot.intake import IntakeError
    from bot.intake.image import DecodeLimits, DecoderUsage, normalise_image, read_local_image
    from bot.intake.request import size_for_aspect
    from generator.protocol import size_multiple

    usage = DecoderUsage()

    def answer(payload: dict[str, Any], code: int) -> int:
        if usage.ran:
            payload["decoder"] = {"peak_rss_mib": None if usage.peak_rss_kib is None else
                                  round(usage.peak_rss_kib / 1024, 1),
                                  "cpu_s": usage.cpu_seconds, "wall_s": usage.wall_seconds}
        print(json.dumps(payload), flush=True)
        return code

    try:
        limits = settings.limits
        width, height = args.width, args.height
        if (width is None) != (height is None):
            raise IntakeError("invalid_request", "Give both --width and --height, or neither.")
        data = read_local_image(args.image, limits.max_upload_bytes)
        family = settings.generation.family
        multiple = size_multiple(settings.default_pipeline(family), family)

        def target(w: int, h: int) -> tuple[int, int]:
            if width is not None and height is not None:
                return width, height
            return size_for_aspect(w, h, settings.pixel_budget(family), multiple)

        result = normalise_image(
            data, target, (args.out or settings.uploads_dir),
            max_pixels=limits.max_image_pixels, min_side=limits.min_image_side, usage=usage,
            limits=DecodeLimits.of(limits),
        )
    except IntakeError as exc:
        return answer({"ok": False, "code": exc.code, "error": exc.message}, EXIT_USAGE)
    except MemoryError:
        return answer({"ok": False, "code": "too_large", "error": "That image needs too much memory."}, EXIT_USAGE)
    except Exception as exc:  # the last resort: still one JSON line, never a traceback
        return answer({"ok": False, "code": "internal_error",
                       "error": f"Reading that image failed unexpectedly ({type(exc).__name__}: {exc})."}, EXIT_USAGE)
    return answer(
        {"ok": True, "path": str(result.path), "width": result.width, "height": result.height,
         "sha256": result.sha256, "notes": result.notes},
        0,
    )


def _shown_url(url: str) -> str:
    """The database URL as an owner may see it printed: never its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    raise SystemExit(main())
