"""Run the real generator on the tiny checkpoints on CUDA and check each clip as the CPU tests do.

    python -m bench.tiny_cuda OUT_DIR                  # LTX-2: every pipeline kind and mode, fp8 on and off
    python -m bench.tiny_cuda OUT_DIR --family ltxv    # LTX-Video, in its own interpreter

Writes ``OUT_DIR/tiny_cuda[-ltxv].json``: the GPU, and per run the exit status, the
checks that failed (none is the pass), the mp4's frames/size/fps/audio as read back
and every phase's peaks. Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from generator.protocol import EXTEND_OVERLAP_FRAMES, DoneEvent, JobSpec, PhaseEvent, StartedEvent, parse_event

_LTX2_HEAD = ["text_encode", "embeddings", "image_encode", "stage_1"]
_LTXV_MULTI_SCALE = ["text_encode", "stage_1", "upsample", "stage_2", "video_decode", "finalize"]
# (family, pipeline, audio) -> the phases a run must report, once each, in this order.
EXPECTED_PHASES: dict[tuple[str, str, bool], list[str]] = {
    ("ltx2", "two_stage", True): [*_LTX2_HEAD, "upsample", "stage_2", "audio_decode", "video_decode", "finalize"],
    ("ltx2", "two_stage", False): [*_LTX2_HEAD, "upsample", "stage_2", "video_decode", "finalize"],
    ("ltx2", "distilled", False): [*_LTX2_HEAD, "upsample", "stage_2", "video_decode", "finalize"],
    ("ltx2", "one_stage", True): [*_LTX2_HEAD, "audio_decode", "video_decode", "finalize"],
    ("ltx2", "two_stage_hq", True): [*_LTX2_HEAD, "upsample", "stage_2", "audio_decode", "video_decode", "finalize"],
    ("ltxv", "distilled", False): _LTXV_MULTI_SCALE,
    ("ltxv", "two_stage", False): _LTXV_MULTI_SCALE,
    ("ltxv", "one_stage", False): ["text_encode", "stage_1", "video_decode", "finalize"],
}
# A mode whose phases differ from its pipeline's: lipsync encodes the user's track and keeps it (no audio decode).
MODE_PHASES: dict[str, list[str]] = {
    "lipsync": [*_LTX2_HEAD[:3], "audio_encode", "stage_1", "upsample", "stage_2", "video_decode", "finalize"],
    # A retake reads its source clip instead of an image (generator/ltx2/retake.py).
    "retake": [*_LTX2_HEAD[:2], "source_encode", "stage_1", "audio_decode", "video_decode", "finalize"],
}
# The retake remakes 0.4-0.8 s of the one_stage run's clip (same size, frames, fps and sound).
RETAKE_SOURCE = "one_stage-True.mp4"
# (pipeline, fp8 cast, audio, mode); LTX-Video has no sound and no fp8 cast. A mode: an end
# image at the last frame, a loop, an owner's LoRA (a tiny one written here), an extension of
# the first run's clip (EXTEND_SOURCE: FRAMES more frames less the overlap), or a retake.
Mode = str | None
RUNS: dict[str, list[tuple[str, bool, bool, Mode]]] = {
    "ltx2": [("two_stage", True, True, None), ("two_stage", False, True, None), ("distilled", True, False, None),
             ("one_stage", True, True, None), ("two_stage_hq", True, True, None),
             ("two_stage", True, True, "end_image"), ("two_stage", True, True, "loop"),
             ("two_stage_hq", True, True, "lora"), ("two_stage", True, True, "lipsync"),
             ("two_stage", True, True, "extend"), ("one_stage", True, True, "retake")],
    "ltxv": [("distilled", False, False, None), ("two_stage", False, False, None), ("one_stage", False, False, None)],
}
SIZE = {"ltx2": (256, 192), "ltxv": (160, 96)}
FRAMES = 25
FPS = 24
EXTEND_SOURCE = "two_stage-True.mp4"
# Modes that read an earlier run's clip (EXTEND_SOURCE, RETAKE_SOURCE).
SOURCED = {"extend", "retake"}


def expected_frames(mode: Mode) -> int:
    return FRAMES + FRAMES - EXTEND_OVERLAP_FRAMES if mode == "extend" else FRAMES


def mode_fields(mode: Mode, image: Path, end_image: Path, lora: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request's and the spec's fields for a mode (the worker fills the spec's from the request)."""
    if mode == "lipsync":  # the track beside the image, as long as the clip (the audio intake cuts it so)
        voice = write_voice(image.parent / "voice.wav", FRAMES / FPS)
        return {"mode": "lipsync", "audio_file": voice.name}, {"audio_path": str(voice)}
    if mode == "end_image":
        return {"end_image": end_image.name}, {"end_image_path": str(end_image)}
    if mode == "loop":
        return {"loop": True}, {"end_image_path": str(image)}
    if mode == "extend":
        source = image.parent / EXTEND_SOURCE
        return ({"mode": "extend", "source_video": source.name, "source_job": 1, "source_frames": FRAMES},
                {"source_video_path": str(source)})
    if mode == "lora":
        return ({"loras": [{"name": "camera", "strength": 0.8}]},
                {"loras": [{"name": "camera", "path": str(lora), "strength": 0.8}]})
    if mode == "retake":
        return ({"mode": "retake", "source_video": RETAKE_SOURCE, "source_job": 1, "retake_start": 0.4,
                 "retake_end": 0.8}, {"source_video_path": str(image.parent / RETAKE_SOURCE)})
    return {}, {}


def write_voice(path: Path, seconds: float, rate: int = 48000) -> Path:
    """A stereo 16-bit WAV of two tones, as the audio intake stores an upload."""
    import math
    import struct
    import wave

    frames = b"".join(
        struct.pack("<hh", int(9000 * math.sin(2 * math.pi * 220 * i / rate)),
                    int(7000 * math.sin(2 * math.pi * 330 * i / rate)))
        for i in range(round(seconds * rate))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)
    return path


def check_run(family: str, pipeline: str, audio: bool, exit_code: int, events: list[Any],
              clip: dict[str, Any] | None, mode: Mode = None, frames: int = FRAMES) -> list[str]:
    """What differs from the CPU tests' expectations; empty when the run passes."""
    width, height = SIZE[family]
    failures = [] if exit_code == 0 else [f"exit {exit_code}"]
    if not events or not isinstance(events[0], StartedEvent) or events[0].device != "cuda":
        failures.append("the first event is not `started` on cuda")
    if not events or not isinstance(events[-1], DoneEvent):
        failures.append("the last event is not `done`")
    else:
        done = events[-1]
        if done.leaked_models:
            failures.append(f"models kept alive across phases: {done.leaked_models}")
        if (done.frames, done.width, done.height, done.has_audio) != (frames, width, height, audio):
            failures.append(f"done reports {done.frames} frames {done.width}x{done.height} audio {done.has_audio}")
    phases = [e for e in events if isinstance(e, PhaseEvent)]
    expected = MODE_PHASES.get(mode or "") or EXPECTED_PHASES[(family, pipeline, audio)]
    if [p.name for p in phases] != expected:
        failures.append(f"phases {[p.name for p in phases]}, expected {expected}")
    for phase in phases:
        figures = (phase.seconds, phase.peak_allocated_gib, phase.peak_reserved_gib, phase.peak_rss_gib)
        if any(value is None or value < 0 for value in figures):
            failures.append(f"phase {phase.name} has a missing or negative figure: {figures}")
    if clip is None:
        failures.append("no clip to read back")
    elif (clip["frames"], clip["width"], clip["height"], clip["fps"], clip["has_audio"]) != (
            frames, width, height, float(FPS), audio):
        failures.append(f"the clip reads back as {clip}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiny_cuda", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(RUNS), default="ltx2")
    parser.add_argument("--jobs", type=int, default=4, help="generator processes at once (default 4)")
    args = parser.parse_args(argv)
    out: Path = args.out
    work = out / f"work-{args.family}"
    work.mkdir(parents=True, exist_ok=True)
    width, height = SIZE[args.family]
    image = work / "in.png"
    Image.new("RGB", (width + 40, height + 20), (90, 140, 200)).save(image)
    end_image = work / "end.png"
    Image.new("RGB", (width + 40, height + 20), (200, 60, 40)).save(end_image)
    files = _tiny_files(args.family, work / "models")
    import torch

    lora = work / "models" / "tiny-camera-lora.safetensors"
    if args.family == "ltx2":
        from generator.ltx2.tiny import write_tiny_lora

        write_tiny_lora(Path(files["checkpoint"]), lora)

    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                              "family": args.family, "runs": []}

    def run(pipeline: str, fp8: bool, audio: bool, mode: Mode) -> dict[str, Any]:
        name = f"{pipeline}-{fp8}" + (f"-{mode}" if mode else "")
        request, extra = mode_fields(mode, image, end_image, lora)
        spec = JobSpec.model_validate({
            "request": {"prompt": "a cat walks on the beach", "family": args.family, "width": width,
                        "height": height, "frames": FRAMES, "fps": FPS, "steps": 4, "seed": 7,
                        "pipeline": pipeline, "audio": audio, **request},
            "image_path": str(image), "output_path": str(work / f"{name}.mp4"), **extra,
            "models" if args.family == "ltx2" else "ltxv_models": files,
            "tiling": {"spatial_px": 64, "spatial_overlap_px": 32, "temporal_frames": 16,
                       "temporal_overlap_frames": 8},
            "fp8_cast": fp8, "device": "cuda",
        })
        spec_path = work / f"{name}.json"
        spec_path.write_text(spec.model_dump_json())
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "generator", str(spec_path)], capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - started
        events = [parse_event(line) for line in proc.stdout.splitlines() if line.strip()]
        clip = _probe(spec.output_path) if proc.returncode == 0 else None
        failures = check_run(args.family, pipeline, audio, proc.returncode, events, clip, mode,
                             expected_frames(mode))
        entry: dict[str, Any] = {
            "pipeline": pipeline, "mode": mode, "fp8_cast": fp8, "audio": audio, "exit": proc.returncode,
            "wall_seconds": round(wall, 1), "failed_checks": failures, "clip": clip,
            "events": [e.model_dump(mode="json") for e in events if e.event in {"started", "phase", "error"}],
        }
        if failures:
            entry["stderr_tail"] = proc.stderr[-3000:]
        print(pipeline, mode or "-", f"fp8={fp8}", f"exit={proc.returncode}", f"{wall:.1f}s",
              "passed" if not failures else f"FAILED: {failures}", flush=True)
        return entry

    # Each run is its own generator process (most of its time is imports), so the runs share the
    # GPU --jobs at a time; an extension and a retake read an earlier run's clip, so they go after.
    runs = RUNS[args.family]
    entries: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for wave in ([i for i, r in enumerate(runs) if r[3] not in SOURCED],
                     [i for i, r in enumerate(runs) if r[3] in SOURCED]):
            for i, entry in zip(wave, pool.map(lambda i: run(*runs[i]), wave), strict=True):
                entries[i] = entry
    report["runs"] = [entries[i] for i in range(len(runs))]
    name = "tiny_cuda.json" if args.family == "ltx2" else f"tiny_cuda-{args.family}.json"
    (out / name).write_text(json.dumps(report, indent=2))
    return 0 if all(not run["failed_checks"] for run in report["runs"]) else 1


def _tiny_files(family: str, root: Path) -> dict[str, str]:
    if family == "ltxv":
        from generator.ltxv.tiny import write_tiny_ltxv

        tiny_ltxv = write_tiny_ltxv(root)
        return {key: str(getattr(tiny_ltxv, key))
                for key in ("checkpoint", "distilled_checkpoint", "spatial_upsampler", "text_encoder_root")}
    from generator.ltx2.tiny import write_tiny_models

    models = write_tiny_models(root)
    return {"checkpoint": str(models.checkpoint), "distilled_checkpoint": str(models.checkpoint),
            "distilled_lora": str(models.distilled_lora), "spatial_upsampler": str(models.spatial_upsampler),
            "gemma_root": str(models.gemma_root)}


def _probe(path: Path) -> dict[str, Any]:
    from generator.encode import probe

    return probe(path)


if __name__ == "__main__":
    raise SystemExit(main())
