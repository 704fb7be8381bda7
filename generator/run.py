"""``python -m generator SPEC``: render one clip, report JSON-lines events on stdout, exit.

``python -m generator --standby [FAMILY]`` does the slow imports of that model
family's backend first (torch, ltx-core or ltx-video, transformers: about 13 s),
reports ``ready``, then reads the spec path from one line
of stdin and goes on exactly as above. CUDA is not touched before the spec arrives,
so a waiting standby holds no GPU memory; end of input makes it exit quietly.
Started by the worker, the generator ends with it (``generator/lifeline.py``).

Exit codes (``protocol.ExitCode``): 0 done, 2 invalid spec, 3 out of memory,
4 model files missing or wrong, 5 clip cannot fit the delivery limit, 1 anything
else. stdout carries only events; logs and library chatter go to stderr.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from generator.checks import (
    DraftStateError,
    ModelFilesError,
    SourceClipError,
    UnsupportedOnDeviceError,
    check_model_files,
)
from generator.lifeline import watch_supervisor_pipe
from generator.protocol import (
    FAMILY_NAMES,
    MODEL_FAMILIES,
    WARM_COMPILER_ENV,
    DoneEvent,
    ErrorCode,
    ErrorEvent,
    ExitCode,
    JobSpec,
    ModelFamily,
    ReadyEvent,
    StartedEvent,
    describe_validation_error,
)

log = logging.getLogger("generator")

OOM_MESSAGE = "The GPU ran out of memory for this clip. Try fewer frames or a smaller size."
INTERNAL_MESSAGE = "The generator failed unexpectedly. The owner can find details in the job's log."


class EventWriter:
    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: BaseModel) -> None:
        self.stream.write(event.model_dump_json() + "\n")
        self.stream.flush()


def _claim_stdout() -> IO[str]:
    """Events get a private copy of stdout; fd 1 then points at stderr, so nothing else can corrupt it."""
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)
    return events


def _read_spec(arg: str) -> JobSpec:
    text = sys.stdin.read() if arg == "-" else Path(arg).read_text(encoding="utf-8")
    return JobSpec.model_validate_json(text)


STANDBY_ARGS: dict[tuple[str, ...], ModelFamily] = {
    ("--standby",): "ltx2", **{("--standby", family): family for family in MODEL_FAMILIES}
}


def backend(family: ModelFamily) -> Callable[[JobSpec, EventWriter], DoneEvent]:
    """The family's ``generate``; importing it is the slow part (torch and the model package)."""
    if family == "ltxv":
        from generator.ltxv import pipeline as ltxv

        return ltxv.generate
    from generator.ltx2 import pipeline

    return pipeline.generate


def _warm_compiler(family: ModelFamily) -> bool:
    """A standby's compiler imports, when the worker's jobs compile (``WARM_COMPILER_ENV``)."""
    if family != "ltx2" or os.environ.get(WARM_COMPILER_ENV) != "1":
        return False
    from generator.ltx2.compiled import warm_imports

    warm_imports()
    return True


def _stager(family: ModelFamily) -> Any:
    """The standby's staging of weights (LTX-2; docs/DESIGN.md, 'Prepared weights and staging'), or None."""
    if family != "ltx2":
        return None
    from generator.ltx2.staging import Stager

    return Stager.from_env()


def library_versions(family: ModelFamily) -> dict[str, str]:
    names = ["torch", "transformers", "ltx-video" if family == "ltxv" else "ltx-core"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _fail(emit: EventWriter, code: ErrorCode, message: str, status: ExitCode) -> int:
    emit(ErrorEvent(code=code, message=message))
    return int(status)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    emit = EventWriter(_claim_stdout())
    waiting_family = STANDBY_ARGS.get(tuple(args))
    if len(args) != 1 and waiting_family is None:
        usage = "usage: python -m generator SPEC.json (or - for stdin, or --standby [ltx2|ltxv])"
        return _fail(emit, "invalid_spec", usage, ExitCode.INVALID_SPEC)
    imported_at: float | None = None
    if waiting_family is None and args[0] != "-":
        watch_supervisor_pipe()
    if waiting_family is not None:
        backend(waiting_family)  # the slow imports, done before the job exists
        warmed = _warm_compiler(waiting_family)
        imported_at = time.perf_counter()
        stager = _stager(waiting_family)  # reads the next job's weights into host memory meanwhile
        emit(ReadyEvent(pid=os.getpid(), import_seconds=round(imported_at - started, 3), compiler_warmed=warmed))
        line = sys.stdin.readline().strip()
        if stager is not None:
            stager.hand_over()
        if not line:
            return int(ExitCode.OK)  # the worker went away before giving us a job
        watch_supervisor_pipe()  # only now: the spec line was ours to read
        args = [line]
    try:
        spec = _read_spec(args[0])
    except ValidationError as exc:
        return _fail(emit, "invalid_spec", describe_validation_error(exc), ExitCode.INVALID_SPEC)
    except (OSError, ValueError) as exc:
        return _fail(emit, "invalid_spec", f"the job spec could not be read: {exc}", ExitCode.INVALID_SPEC)
    if waiting_family is not None and spec.family != waiting_family:
        message = f"this generator was started for the {waiting_family} family, not {spec.family}"
        return _fail(emit, "invalid_spec", message, ExitCode.INVALID_SPEC)
    try:
        check_model_files(spec)
    except ModelFilesError as exc:
        return _fail(emit, "model_missing", str(exc), ExitCode.MODEL_MISSING)

    try:
        generate = backend(spec.family)
    except ImportError as exc:
        message = (f"The {FAMILY_NAMES[spec.family]} libraries are not installed for this generator's interpreter "
                   f"({exc.name}); see the README's model families section.")
        return _fail(emit, "model_missing", message, ExitCode.MODEL_MISSING)

    import torch

    from generator.encode import ClipTooLargeError
    from generator.phases import pick_device

    device = pick_device(spec.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(StartedEvent(pid=os.getpid(), device=device.type, device_name=name, family=spec.family,
                      import_seconds=round((imported_at or time.perf_counter()) - started, 3),
                      libraries=library_versions(spec.family)))
    try:
        done = generate(spec, emit)
    except torch.OutOfMemoryError:
        log.exception("out of memory")
        return _fail(emit, "oom", OOM_MESSAGE, ExitCode.OOM)
    except ModelFilesError as exc:
        return _fail(emit, "model_missing", str(exc), ExitCode.MODEL_MISSING)
    except UnsupportedOnDeviceError as exc:
        return _fail(emit, "invalid_spec", str(exc), ExitCode.INVALID_SPEC)
    except ClipTooLargeError as exc:
        return _fail(emit, "too_large", str(exc), ExitCode.TOO_LARGE)
    except DraftStateError as exc:
        return _fail(emit, "invalid_spec", f"This clip cannot be finalized: {exc}.", ExitCode.INVALID_SPEC)
    except SourceClipError as exc:
        what = {"extend": "extended", "retake": "retaken"}.get(spec.request.mode, "made")
        return _fail(emit, "invalid_spec", f"This clip cannot be {what}: {exc}.", ExitCode.INVALID_SPEC)
    except Exception:
        log.exception("generation failed")
        return _fail(emit, "internal", INTERNAL_MESSAGE, ExitCode.INTERNAL)
    emit(done)
    return int(ExitCode.OK)
