"""The generator's own model ops (``generator/ltx2/models.py``): each must give the numbers that
ltx-core's stock model gives, and each test must be able to fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python

pytestmark = pytest.mark.slow

CHUNKED = """
import torch
from ltx_core.model.transformer.feed_forward import FeedForward
from generator.ltx2.models import chunk_feed_forward
torch.manual_seed(0)
ff = FeedForward(16, 16)
x = torch.randn(2, 50, 16)
with torch.inference_mode():
    reference = ff(x)
    chunk_feed_forward(ff, chunk_tokens=16)
    chunked = ff(x)
    short = ff(x[:, :10])
import json
print(json.dumps([float((reference - chunked).abs().max()), list(chunked.shape), list(short.shape)]))
"""

BY_VALUE = """
import json, sys
import torch
from ltx_core.loader.module_ops import ModuleOps
import generator.ltx2.models as models
from generator.ltx2.pipeline import generate
from generator.protocol import JobSpec

built = []
original_init = models.TokenTimesteps.__init__
def counting_init(self, rows, index):
    built.append(rows.shape[0])
    original_init(self, rows, index)
models.TokenTimesteps.__init__ = counting_init
original_transformer = models.LtxLedger.transformer
outputs = []
def transformer(self):
    model = original_transformer(self)
    model.register_forward_hook(lambda m, i, o: outputs.append([t.float().clone() for t in o if t is not None]))
    return model
models.LtxLedger.transformer = transformer

spec = JobSpec.model_validate_json(open(sys.argv[1]).read())
generate(spec, lambda event: None)
by_value, outputs = outputs, []
models.TIMESTEPS_BY_VALUE = ModuleOps(name="off", matcher=lambda m: False, mutator=lambda m: m)
generate(spec.model_copy(update={"output_path": spec.output_path.with_name("stock.mp4")}), lambda event: None)
stock = outputs
diff = max(float((a - b).abs().max()) for x, y in zip(by_value, stock) for a, b in zip(x, y))
scale = max(float(b.abs().max()) for y in stock for b in y)
print(json.dumps({"calls": [len(by_value), len(stock)], "diff": diff, "scale": scale, "rows": sorted(set(built))}))
"""

TEXT_ONLY = """
import json, sys
from dataclasses import replace
import torch
from generator.ltx2.weights import StoreLoader
from ltx_core.text_encoders.gemma import GemmaTextEncoder
from ltx_core.text_encoders.gemma.encoders.encoder_configurator import GEMMA_LLM_KEY_OPS, GEMMA_MODEL_OPS
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
import generator.ltx2.models as models

root = sys.argv[1]
ledger = models.LtxLedger(dtype=torch.float32, device=torch.device("cpu"),
                          checkpoint_path=root + "/ltx-2.3-tiny-dev.safetensors", gemma_root_path=root + "/gemma")
read = []
original_load = StoreLoader.load
def recording_load(self, path, sd_ops=None, device=None):
    state = original_load(self, path, sd_ops, device)
    read.append(sorted(state.sd))
    return state
StoreLoader.load = recording_load

class WholeGemma(models.GemmaFromConfigJson):
    @classmethod
    def from_config(cls, config):
        with torch.device("meta"):
            return GemmaTextEncoder(model=Gemma3ForConditionalGeneration(Gemma3Config.from_dict(config)))

text_only = ledger.text_encoder()
ledger.text_encoder_builder = replace(  # what ltx-core builds: the whole model, every key
    ledger.text_encoder_builder, model_class_configurator=WholeGemma, model_sd_ops=GEMMA_LLM_KEY_OPS,
    module_ops=tuple(GEMMA_MODEL_OPS if op is models.GEMMA_TEXT_MODEL_OPS else op
                     for op in ledger.text_encoder_builder.module_ops),
)
whole = ledger.text_encoder()
with torch.inference_mode():
    a, mask_a = text_only.encode("waves roll in at dusk")
    b, mask_b = whole.encode("waves roll in at dusk")
count = lambda m: sum(p.numel() for p in m.parameters())
print(json.dumps({
    "layers": [len(a), len(b)], "diff": max(float((x - y).abs().max()) for x, y in zip(a, b)),
    "masks_equal": bool(torch.equal(mask_a, mask_b)), "params": [count(text_only.model), count(whole.model)],
    "vision_read": [any(k.startswith(("model.model.vision", "model.model.multi_modal")) for k in keys)
                    for keys in read],
}))
"""


def test_chunked_feed_forward_gives_the_same_result() -> None:
    difference, shape, short = json.loads(run_python(CHUNKED))
    assert difference < 1e-6
    assert shape == [2, 50, 16] and short == [2, 10, 16]


def test_timesteps_by_value_give_the_stock_transformer_outputs(tmp_path: Path, tiny_models: Path) -> None:
    from tests.test_generator import make_spec

    spec = make_spec(tmp_path, tiny_models, pipeline="two_stage", audio=True, width=128, height=64, frames=9,
                     steps=2)
    spec = spec.model_copy(update={"dtype": "float32"})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    result = json.loads(run_python(BY_VALUE, str(tmp_path / "spec.json")))
    # Stage 1 (2 steps, guided: several forwards each) and stage 2 (3 steps) all ran both ways.
    assert result["calls"][0] == result["calls"][1] >= 5
    # Video with its conditioned first frame keeps 2 rows instead of one per token; audio, all
    # noisy, keeps 1.
    assert 2 in result["rows"] and max(result["rows"]) <= 3
    # float32 on CPU: 1.9e-6 apart here (the AdaLN runs over 2 rows instead of 1,152, so its
    # matmuls round differently); gathering the wrong rows moved outputs by 3.8e-5.
    assert result["diff"] <= 1.5e-6 * result["scale"], result


def test_text_only_gemma_encodes_as_the_whole_model_and_never_reads_the_vision_tower(tiny_models: Path) -> None:
    result = json.loads(run_python(TEXT_ONLY, str(tiny_models)))
    assert result["layers"][0] == result["layers"][1] > 1 and result["masks_equal"]
    assert result["diff"] == 0.0  # the same language model on the same tokens
    assert result["params"][0] < result["params"][1]  # tower and projector not built
    assert result["vision_read"] == [False, True]  # nor their weights read (the stock build reads them)
