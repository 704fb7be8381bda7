"""Block streaming (``generator/ltx2/streaming.py``) and the VRAM budget's plan (``generator/ltx2/plan.py``).

Streaming must change no bits and must refuse to compute when blocks run in another order
than the one it streams for; the planner must keep a phase's device-resident weights under a
budget given in bytes, measured from the tensors themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from generator.protocol import JobSpec
from tests.conftest import TINY_TILING, image_bytes, run_python, tiny_model_settings

TOY = """
import json, sys
import torch
from generator.ltx2.streaming import StreamOrderError, stream

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(6))
    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x

x = torch.randn(3, 8)
with torch.inference_mode():
    reference = Toy()(x)
    out = {}
    for resident in (0, 2, 5):
        model = Toy()
        streamer = stream(model, model, model.blocks, torch.device("cpu"), resident=resident, prefix="b")
        first, second = model(x), model(x)
        out[f"equal_{resident}"] = bool(torch.equal(first, reference) and torch.equal(second, reference))
        out[f"order_{resident}"] = streamer.stats.brought_in
        # At rest a streamed block's weights are its host copy, not a slot.
        out[f"at_rest_{resident}"] = all(
            p.data_ptr() >= packed.host.data_ptr() and p.data_ptr() < packed.host.data_ptr() + packed.nbytes
            for packed in streamer.packed for p in packed.module.parameters())
    case = sys.argv[1]
    model = Toy()
    stream(model, model, model.blocks, torch.device("cpu"), resident=1, prefix="b")
    if case == "swap":
        model.blocks[2], model.blocks[3] = model.blocks[3], model.blocks[2]
    elif case == "skip":
        del model.blocks[4]
    elif case == "skip_last":
        del model.blocks[5]
    try:
        model(x)
        out["error"] = None
    except StreamOrderError as exc:
        out["error"] = str(exc)
print(json.dumps(out))
"""


def test_streamed_blocks_give_the_resident_bits_in_forward_order() -> None:
    out = json.loads(run_python(TOY, "none"))
    for resident in (0, 2, 5):
        assert out[f"equal_{resident}"], resident
        assert out[f"at_rest_{resident}"], resident
    # Two forwards, each bringing in every streamed block once, in order; resident blocks never.
    assert out["order_0"] == [f"b{i}" for i in range(6)] * 2
    assert out["order_2"] == [f"b{i}" for i in range(2, 6)] * 2
    assert out["order_5"] == ["b5"] * 2
    assert out["error"] is None


@pytest.mark.parametrize(("case", "says"), [("swap", "b3 ran where b2 was expected"),
                                             ("skip", "b5 ran where b4 was expected"),
                                             ("skip_last", "b5 and 0 after it never run")])
def test_wrong_order_or_skipped_block_is_detected(case: str, says: str) -> None:
    out = json.loads(run_python(TOY, case))
    assert out["error"] is not None and says in out["error"]


PIPELINE = """
import hashlib, json, sys
from generator.ltx2 import pipeline
from generator.protocol import JobSpec, PhaseEvent
import generator.ltx2.plan as plan_module
from generator.ltx2.streaming import streamers_of

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
found = {}
def latents(stage, video, audio):
    data = video.latent.float().numpy().tobytes() + audio.latent.float().numpy().tobytes()
    found[stage] = hashlib.sha256(data).hexdigest()
pipeline.DENOISE_OBSERVERS.append(latents)
# Weight bytes on the "device" at every streamed block's entry: every model tensor that is not a view
# of a streamer's host copy, plus the slots (measured from the tensors, not taken from the plan).
peaks = {}
pins = {}
original = plan_module.BudgetedLedger._streamed
def measured(self, model, phase, parts, activation_phases, *, pin):
    pins[phase] = pin
    model = original(self, model, phase, parts, activation_phases, pin=pin)
    streamers = streamers_of(model)
    hosts = [(p.host.data_ptr(), p.host.data_ptr() + p.nbytes) for s in streamers for p in s.packed]
    def device_bytes(*_):
        # Tensor bytes, tied tensors once (on the CPU a loaded tensor may view a larger file buffer,
        # which on a GPU place() never copies).
        seen = {}
        for t in [*model.parameters(), *model.buffers()]:
            if not any(a <= t.data_ptr() < b for a, b in hosts):
                seen[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.nbytes
        total = sum(seen.values()) + sum(s.slot_bytes for s in streamers)
        peaks[phase] = max(peaks.get(phase, 0), total)
    for s in streamers:
        for p in s.packed:
            p.module.register_forward_hook(device_bytes)
    device_bytes()
    return model
plan_module.BudgetedLedger._streamed = measured
events = []
pipeline.generate(spec, events.append)
plans = {e.name: e.plan for e in events if isinstance(e, PhaseEvent) and e.plan}
frames = hashlib.sha256(open(spec.output_path, "rb").read()).hexdigest()
print(json.dumps({"latents": found, "plans": plans, "peaks": peaks, "clip": frames, "pins": pins}))
"""


def _spec(tmp_path: Path, tiny_models: Path, name: str, pipeline: str, budget: float | None) -> Path:
    image = tmp_path / "in.png"
    image.write_bytes(image_bytes(size=(128, 128)))
    spec = JobSpec.model_validate({
        "request": {"prompt": "waves roll in", "width": 128, "height": 64, "frames": 9, "steps": 1,
                    "seed": 3, "pipeline": pipeline, "audio": True},
        "image_path": str(image), "output_path": str(tmp_path / f"{name}.mp4"),
        "models": tiny_model_settings(tiny_models), "tiling": TINY_TILING, "device": "cpu", "fp8_cast": False,
        "vram_budget_gib": budget,
    })
    path = tmp_path / f"{name}.json"
    path.write_text(spec.model_dump_json())
    return path


def _run(tmp_path: Path, tiny_models: Path, name: str, pipeline: str, budget: float | None) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(run_python(PIPELINE, str(_spec(tmp_path, tiny_models, name, pipeline, budget))))
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("pipeline", ["two_stage", "distilled", "one_stage"])
def test_streamed_pipeline_gives_the_resident_clip(tmp_path: Path, tiny_models: Path, pipeline: str) -> None:
    resident = _run(tmp_path, tiny_models, "resident", pipeline, None)
    # A budget far below the tiny models: every streamable model streams every block.
    streamed = _run(tmp_path, tiny_models, "streamed", pipeline, 1e-6)
    assert streamed["plans"]["stage_1"]["streamed"] > 0
    assert streamed["plans"]["text_encode"]["streamed"] > 0
    assert streamed["latents"] == resident["latents"]
    assert streamed["clip"] == resident["clip"]  # frames and audio, muxed the same way
    # Pinned host copies only for the transformer, whose blocks cross the bus on every step.
    assert streamed["pins"] == {"text_encode": False, "embeddings": False, "stage_1": True}, streamed["pins"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_planner_keeps_each_phase_under_a_byte_budget(tmp_path: Path, tiny_models: Path) -> None:
    free = _run(tmp_path, tiny_models, "free", "one_stage", 1.0)  # 1 GiB: everything fits, nothing streams
    assert all(plan.get("streamed", 0) == 0 for plan in free["plans"].values())
    # Below the tiny transformer's 303,136 bytes (2 blocks of 62,976 and 177,184 of the rest): it must
    # stream both blocks through one slot (two would not fit either).
    budget = 280_000
    out = _run(tmp_path, tiny_models, "tight", "one_stage", budget / 2**30)
    assert out["plans"]["stage_1"]["streamed"] == 2 and out["plans"]["stage_1"]["slots"] == 1, out["plans"]
    assert "stage_1" in out["peaks"]
    for phase, peak in out["peaks"].items():
        assert peak <= budget, (phase, peak)
    assert out["latents"] == free["latents"]


TIED = """
import json
import torch
from generator.ltx2.streaming import place, unique_bytes
m = torch.nn.Module()
m.embed = torch.nn.Embedding(10, 4)
m.head = torch.nn.Linear(4, 10, bias=False)
w = torch.randn(10, 4)
# Tied as Gemma's builder ties them: two Parameters over one tensor (load_state_dict with assign).
m.load_state_dict({"embed.weight": w, "head.weight": w}, assign=True)
counted = unique_bytes(m.parameters())
place(m, torch.device("meta"), [])
print(json.dumps({"tied": m.embed.weight is m.head.weight, "counted": counted}))
"""


def test_moving_a_model_keeps_tied_weights_one_tensor() -> None:
    # The H200 run before this fix put a second copy of Gemma's 1.9 GiB embedding on the GPU.
    out = json.loads(run_python(TIED))
    assert out == {"tied": True, "counted": 160}


TWO_PARTS = """
import json
from types import SimpleNamespace
import torch
from generator import predict
from generator.ltx2.plan import BudgetedLedger

class Part(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_1d_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

model = torch.nn.Module()
model.head = torch.nn.Linear(4, 4)
model.video, model.audio = Part(), Part()
planner = SimpleNamespace(
    budget_gib=1.0, device=torch.device("meta"), allowance=None,
    resident_blocks=lambda *a: predict.PhasePlan(resident=2, streamed=4, peak_gib=0.0, slots=1),
    tracker=SimpleNamespace(note_plan=lambda **kw: None))
parts = [(c, c.transformer_1d_blocks, name + ".") for name, c in (("video", model.video), ("audio", model.audio))]
BudgetedLedger(None, planner)._streamed(model, "embeddings", parts, ("embeddings",), pin=False)
print(json.dumps({name: sorted({p.device.type for p in block.parameters()})
                  for part in ("video", "audio") for i, block in enumerate(getattr(model, part).transformer_1d_blocks)
                  for name in [f"{part}{i}"]} | {"head": [model.head.weight.device.type]}))
"""


def test_a_model_of_two_streamed_parts_keeps_both_parts_streamed_blocks_on_the_host() -> None:
    # The embeddings processor streams two connectors: moving the rest of the model for one part
    # uploaded the other's streamed blocks (H200, 8 GiB budget: out of memory in the embeddings phase).
    out = json.loads(run_python(TWO_PARTS))
    assert out == {"video0": ["meta"], "video1": ["meta"], "video2": ["cpu"],
                   "audio0": ["cpu"], "audio1": ["cpu"], "audio2": ["cpu"], "head": ["meta"]}
