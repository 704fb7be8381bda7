"""Stage 1's multi-modal guidance with its passes batched into fewer transformer forwards.

Each guided step runs up to four passes over the same latents: conditional, negative
prompt (CFG), STG (self-attention skipped in the ``stg_blocks``) and isolated modality
(audio-video cross-attention skipped). They differ only in their text context and in
their perturbations, and ltx-core's transformer takes per-sample perturbation masks
(``BatchedPerturbationConfig``), so up to ``max_batch`` of them can share one forward:
one pass over the weights serves them all, for more activation memory. Passes batched
together agree with the passes run alone up to float rounding, not bit for bit
(matmuls over more rows round differently).

``max_batch=1`` makes the very calls ltx-pipelines' ``multi_modal_guider_factory_denoising_func``
makes, in its order, with its arguments: bit-identical to it (``tests/test_guidance.py``).
The per-pass results are combined by ltx-core's own ``MultiModalGuider.calculate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from ltx_core.components.guiders import MultiModalGuider, MultiModalGuiderFactory
from ltx_core.guidance.perturbations import (
    BatchedPerturbationConfig,
    Perturbation,
    PerturbationConfig,
    PerturbationType,
)
from ltx_core.model.transformer.modality import Modality
from ltx_core.types import LatentState
from ltx_pipelines.utils.helpers import modality_from_latent_state

PassName = Literal["cond", "uncond", "ptb", "mod"]
DenoiseFn = Callable[[LatentState, LatentState, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
MAX_GUIDANCE_BATCH = 4  # there are at most four passes per step


@dataclass(frozen=True)
class GuidancePass:
    """One transformer pass of a guided step: its contexts, perturbations and enabled modalities."""

    name: PassName
    video_context: torch.Tensor
    audio_context: torch.Tensor
    perturbations: PerturbationConfig | None  # None: nothing skipped (ltx-pipelines passes None too)
    video_enabled: bool
    audio_enabled: bool


def guidance_passes(
    video_guider: MultiModalGuider,
    audio_guider: MultiModalGuider,
    v_context: torch.Tensor,
    a_context: torch.Tensor,
    step_index: int,
) -> list[GuidancePass]:
    """The passes ltx-pipelines 1.0.0 runs for one step, in its order (``multi_modal_guider_denoising_func``)."""
    v_on = not video_guider.should_skip_step(step_index)
    a_on = not audio_guider.should_skip_step(step_index)
    passes = [GuidancePass("cond", v_context, a_context, None, v_on, a_on)]
    if video_guider.do_unconditional_generation() or audio_guider.do_unconditional_generation():
        if video_guider.do_unconditional_generation() and video_guider.negative_context is None:
            raise ValueError("Negative context is required for unconditioned denoising")
        if audio_guider.do_unconditional_generation() and audio_guider.negative_context is None:
            raise ValueError("Negative context is required for unconditioned denoising")
        v_neg = video_guider.negative_context if video_guider.negative_context is not None else v_context
        a_neg = audio_guider.negative_context if audio_guider.negative_context is not None else a_context
        # The negative pass always runs both modalities, whatever the skip steps say, as in ltx-pipelines 1.0.0.
        passes.append(GuidancePass("uncond", v_neg, a_neg, None, True, True))
    stg: list[Perturbation] = []
    if video_guider.do_perturbed_generation():
        stg.append(Perturbation(type=PerturbationType.SKIP_VIDEO_SELF_ATTN, blocks=video_guider.params.stg_blocks))
    if audio_guider.do_perturbed_generation():
        stg.append(Perturbation(type=PerturbationType.SKIP_AUDIO_SELF_ATTN, blocks=audio_guider.params.stg_blocks))
    if stg:
        passes.append(GuidancePass("ptb", v_context, a_context, PerturbationConfig(perturbations=stg), v_on, a_on))
    if video_guider.do_isolated_modality_generation() or audio_guider.do_isolated_modality_generation():
        isolated = PerturbationConfig(perturbations=[
            Perturbation(type=PerturbationType.SKIP_A2V_CROSS_ATTN, blocks=None),
            Perturbation(type=PerturbationType.SKIP_V2A_CROSS_ATTN, blocks=None),
        ])
        passes.append(GuidancePass("mod", v_context, a_context, isolated, v_on, a_on))
    return passes


def plan_forwards(passes: list[GuidancePass], max_batch: int) -> list[list[GuidancePass]]:
    """Group passes into forwards of at most ``max_batch``; one forward has one enabled flag per modality."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1; got {max_batch}")
    forwards: list[list[GuidancePass]] = []
    open_by_flags: dict[tuple[bool, bool], list[GuidancePass]] = {}
    for item in passes:
        flags = (item.video_enabled, item.audio_enabled)
        group = open_by_flags.get(flags)
        if group is None or len(group) == max_batch:
            group = []
            open_by_flags[flags] = group
            forwards.append(group)
        group.append(item)
    return forwards


def perturbation_batch(forward: list[GuidancePass]) -> BatchedPerturbationConfig:
    """Sample ``i`` of the batch gets pass ``i``'s perturbations (tests swap these to prove they matter)."""
    return BatchedPerturbationConfig(
        perturbations=[p.perturbations or PerturbationConfig.empty() for p in forward]
    )


def _stack(modalities: list[Modality]) -> Modality:
    """One batched modality from per-pass ones built by ltx-pipelines' own helper (sigma becomes (B,))."""
    first = modalities[0]
    masks = [m.attention_mask for m in modalities]
    return Modality(
        latent=torch.cat([m.latent for m in modalities]),
        sigma=torch.cat([m.sigma.reshape(-1) for m in modalities]),
        timesteps=torch.cat([m.timesteps for m in modalities]),
        positions=torch.cat([m.positions for m in modalities]),
        context=torch.cat([m.context for m in modalities]),
        enabled=first.enabled,
        context_mask=None,
        attention_mask=None if masks[0] is None else torch.cat([m for m in masks if m is not None]),
    )


def run_passes(
    transformer: Any,
    passes: list[GuidancePass],
    video_state: LatentState,
    audio_state: LatentState,
    sigma: torch.Tensor,
    max_batch: int,
) -> dict[PassName, tuple[torch.Tensor, torch.Tensor]]:
    """Denoised (video, audio) of every pass, from as few forwards as ``max_batch`` allows."""
    results: dict[PassName, tuple[torch.Tensor, torch.Tensor]] = {}
    for forward in plan_forwards(passes, max_batch):
        videos = [modality_from_latent_state(video_state, p.video_context, sigma, enabled=p.video_enabled)
                  for p in forward]
        audios = [modality_from_latent_state(audio_state, p.audio_context, sigma, enabled=p.audio_enabled)
                  for p in forward]
        if len(forward) == 1:
            (only,) = forward
            single = None if only.perturbations is None else BatchedPerturbationConfig(
                perturbations=[only.perturbations]
            )
            results[only.name] = transformer(video=videos[0], audio=audios[0], perturbations=single)
            continue
        denoised_video, denoised_audio = transformer(
            video=_stack(videos), audio=_stack(audios), perturbations=perturbation_batch(forward)
        )
        for item, v, a in zip(forward, denoised_video.split(1), denoised_audio.split(1), strict=True):
            results[item.name] = (v, a)
        del denoised_video, denoised_audio
    return results


def batched_guider_denoising_func(
    video_guider_factory: MultiModalGuiderFactory,
    audio_guider_factory: MultiModalGuiderFactory | None,
    v_context: torch.Tensor,
    a_context: torch.Tensor,
    transformer: Any,
    max_batch: int = 1,
) -> DenoiseFn:
    """ltx-pipelines' ``multi_modal_guider_factory_denoising_func`` with its passes run ``max_batch`` at a time.

    Guiders are resolved per step from sigma by the factories, a modality whose
    ``skip_step`` says so keeps its last result, and ``MultiModalGuider.calculate``
    combines the passes, all as there.
    """
    last_video: torch.Tensor | None = None
    last_audio: torch.Tensor | None = None
    sigma_values: list[float] | None = None

    def step(
        video_state: LatentState, audio_state: LatentState, sigmas: torch.Tensor, step_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal last_video, last_audio, sigma_values
        if sigma_values is None:
            sigma_values = sigmas.detach().cpu().tolist()
        sigma_value = sigma_values[step_index]
        video_guider = video_guider_factory.build_from_sigma(sigma_value)
        audio_guider = (audio_guider_factory or video_guider_factory).build_from_sigma(sigma_value)
        skip_video = video_guider.should_skip_step(step_index)
        skip_audio = audio_guider.should_skip_step(step_index)
        if skip_video and skip_audio:
            assert last_video is not None and last_audio is not None, "the first step is never skipped"
            return last_video, last_audio
        passes = guidance_passes(video_guider, audio_guider, v_context, a_context, step_index)
        out = run_passes(transformer, passes, video_state, audio_state, sigmas[step_index], max_batch)
        cond_v, cond_a = out["cond"]
        uncond_v, uncond_a = out.get("uncond", (0.0, 0.0))
        ptb_v, ptb_a = out.get("ptb", (0.0, 0.0))
        mod_v, mod_a = out.get("mod", (0.0, 0.0))
        video = last_video if skip_video else video_guider.calculate(cond_v, uncond_v, ptb_v, mod_v)
        audio = last_audio if skip_audio else audio_guider.calculate(cond_a, uncond_a, ptb_a, mod_a)
        assert video is not None and audio is not None
        last_video, last_audio = video, audio
        return video, audio

    return step
