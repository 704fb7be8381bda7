"""The denoising stages of ``two_stage_hq``: ltx-pipelines' ``TI2VidTwoStagesHQPipeline`` composed.

Against ``two_stage`` three things change (docs/DESIGN.md, 'Modes'): both stages sample with
res_2s (a second-order sampler: two model calls a step, so 15 steps stand for about 30
Euler ones); stage 1 already carries the distilled LoRA, at 0.25, and stage 2 carries it at
0.5; stage 1's sigma schedule is shifted by the latent's token count. Prompts, image
conditioning, the upsample, decoding and the streaming encode are ``two_stage``'s own
(``generator/ltx2/pipeline.py``). The two transformers differ in their fused strengths, so
stage 2 builds its own from the checkpoint, after stage 1's is freed: fusing 0.5 on top of
0.25 would round differently from ltx-core's one sum of deltas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from ltx_core.components.diffusion_steps import Res2sDiffusionStep
from ltx_core.components.schedulers import LTX2Scheduler
from ltx_core.loader import LoraPathStrengthAndSDOps
from ltx_core.loader.sd_ops import LTXV_LORA_COMFY_RENAMING_MAP
from ltx_core.model.upsampler import upsample_video
from ltx_core.tools import VideoLatentShape
from ltx_core.types import VideoPixelShape
from ltx_pipelines.utils.constants import LTX_2_3_HQ_PARAMS, STAGE_2_DISTILLED_SIGMA_VALUES
from ltx_pipelines.utils.samplers import res2s_audio_video_denoising_loop

if TYPE_CHECKING:
    from generator.ltx2.pipeline import _Run

# ltx-pipelines' defaults for the HQ pipeline (``hq_2_stage_arg_parser``).
DISTILLED_LORA_STRENGTH_STAGE_1 = 0.25
DISTILLED_LORA_STRENGTH_STAGE_2 = 0.5
HQ_PARAMS = LTX_2_3_HQ_PARAMS
# res_2s: one call at the step's start and one at its midpoint.
RES2S_EVALUATIONS_PER_STEP = 2


def distilled_lora(run: _Run, strength: float) -> LoraPathStrengthAndSDOps:
    path = run.spec.models.distilled_lora
    assert path is not None, "checks.py requires models.distilled_lora for two_stage_hq"
    return LoraPathStrengthAndSDOps(str(path), strength, LTXV_LORA_COMFY_RENAMING_MAP)


def hq_stages(run: _Run, cond_1: list[Any], cond_2: list[Any], width_1: int, height_1: int) -> tuple[Any, Any]:
    """Stage 1 (guided, res_2s, LoRA 0.25), the upsample, stage 2 (res_2s, LoRA 0.5).

    The ledger's own LoRAs (the owner's) come first in both, as ltx-pipelines orders them.
    """
    from generator.ltx2.pipeline import preparer  # the pipeline imports this module

    req, tracker, ledger, device = run.spec.request, run.tracker, run.ledger, run.device
    prepare = preparer(run.spec)
    steps = req.steps or HQ_PARAMS.num_inference_steps

    with tracker.phase("stage_1"):
        stage_1 = (distilled_lora(run, DISTILLED_LORA_STRENGTH_STAGE_1),)
        transformer = tracker.watch(prepare(ledger.transformer_with_loras(stage_1)), "transformer + LoRA")
        shape_1 = VideoPixelShape(batch=1, frames=req.frames, width=width_1, height=height_1, fps=req.fps)
        # The schedule's shift follows the token count: ltx-pipelines hands the scheduler an empty latent of this shape.
        empty = torch.empty(VideoLatentShape.from_pixel_shape(shape_1).to_torch_shape())
        sigmas = LTX2Scheduler().execute(latent=empty, steps=steps).to(dtype=torch.float32, device=device)
        del empty
        video_state, audio_state = run.denoise(
            "generating", transformer, sigmas, shape_1, cond_1, guided=True, steps_params=HQ_PARAMS,
            sampler=res2s_audio_video_denoising_loop, stepper=Res2sDiffusionStep(),
            evaluations_per_step=RES2S_EVALUATIONS_PER_STEP,
        )
        del transformer

    with tracker.phase("upsample"):
        run.progress("upsampling", 0, 1)
        encoder = tracker.watch(ledger.video_encoder(), "video encoder")
        upsampler = tracker.watch(ledger.spatial_upsampler(), "spatial upsampler")
        upscaled = upsample_video(latent=video_state.latent[:1], video_encoder=encoder, upsampler=upsampler)
        del encoder, upsampler, video_state

    with tracker.phase("stage_2"):
        stage_2 = (distilled_lora(run, DISTILLED_LORA_STRENGTH_STAGE_2),)
        transformer = tracker.watch(prepare(ledger.transformer_with_loras(stage_2)), "transformer + LoRA")
        sigmas = torch.tensor(STAGE_2_DISTILLED_SIGMA_VALUES, dtype=torch.float32, device=device)
        shape_2 = VideoPixelShape(batch=1, frames=req.frames, width=req.width, height=req.height, fps=req.fps)
        video_state, audio_state = run.denoise(
            "refining", transformer, sigmas, shape_2, cond_2, guided=False, steps_params=HQ_PARAMS,
            sampler=res2s_audio_video_denoising_loop, stepper=Res2sDiffusionStep(),
            evaluations_per_step=RES2S_EVALUATIONS_PER_STEP,
            noise_scale=sigmas[0], initial_video_latent=upscaled, initial_audio_latent=audio_state.latent,
        )
        del transformer, upscaled
    return video_state, audio_state
