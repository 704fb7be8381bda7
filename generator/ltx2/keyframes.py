"""Which images condition a clip, and how: the first frame alone, or first and last (end image, loop).

A first image alone replaces the first latent frame, as ltx-pipelines' image-to-video
pipelines do (``combined_image_conditionings``). With an image at the last frame too, both
images are added as guiding keyframes, as its ``KeyframeInterpolationPipeline`` does
(``image_conditionings_by_adding_guiding_latent``); the rest of the run is the kind's own, so
a ``two_stage`` job with an end image is that pipeline, step for step (docs/DESIGN.md, 'Modes').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ltx_pipelines.utils.args import ImageConditioningInput
from ltx_pipelines.utils.helpers import combined_image_conditionings, image_conditionings_by_adding_guiding_latent

if TYPE_CHECKING:
    from generator.protocol import JobSpec

ConditionImages = Callable[..., list[Any]]


def conditioning_images(spec: JobSpec) -> tuple[list[ImageConditioningInput], ConditionImages]:
    """The images with their frame indices, and the ltx-pipelines helper that turns them into conditionings."""
    req = spec.request
    first = ImageConditioningInput(str(spec.image_path), 0, req.image_strength)
    if spec.end_image_path is None:
        return [first], combined_image_conditionings
    last = ImageConditioningInput(str(spec.end_image_path), req.frames - 1, req.image_strength)
    return [first, last], image_conditionings_by_adding_guiding_latent
