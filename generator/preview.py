"""Live previews: a PNG of stage 1's current denoised estimate, at most every few seconds.

The preview is one latent frame (the middle one: the first is the input image) decoded by
the job's own video decoder, so it shows what the model has, not an approximation of it.
One latent frame through LTX-2's causal decoder is one pixel frame; the decoder is built at
the first preview and freed when stage 1 ends, and its noise comes from a generator of its
own, so the clip is the same bits with previews on or off (docs/DESIGN.md, 'Drafts and previews').
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from ltx_core.types import VideoLatentShape, VideoPixelShape
from PIL import Image

from generator.protocol import PreviewEvent

if TYPE_CHECKING:
    from generator.ltx2.pipeline import _Run

log = logging.getLogger(__name__)

PREVIEW_STAGE = "generating"  # stage 1's progress name


def latent_frame(denoised: torch.Tensor, shape: VideoPixelShape) -> torch.Tensor | None:
    """The middle latent frame of a patchified video estimate ``[1, f*h*w, c]`` as ``[1, c, 1, h, w]``.

    ltx-core's patchifier orders tokens ``(f h w)`` with patch size 1; an image conditioning by
    latent index replaces tokens in place, so the count is exactly ``f*h*w`` (None otherwise).
    """
    grid = VideoLatentShape.from_pixel_shape(shape, latent_channels=denoised.shape[-1])
    per_frame = grid.height * grid.width
    if denoised.shape[1] != grid.frames * per_frame:
        return None
    middle = grid.frames // 2
    tokens = denoised[:1, middle * per_frame:(middle + 1) * per_frame]
    return tokens.reshape(1, grid.height, grid.width, -1).permute(0, 3, 1, 2).unsqueeze(2)


class Previewer:
    """A step observer of the run (``_Run.step_observers``) that writes and announces previews."""

    def __init__(self, run: _Run) -> None:
        assert run.spec.preview_dir is not None
        self.run = run
        self.every = run.spec.preview_every_seconds
        self.folder = run.spec.preview_dir
        self.decoder: Any = None
        self.last: float | None = None
        self.count = 0
        self.noise = torch.Generator(device=run.device)

    def __call__(self, stage: str, step: int, total: int, denoised: torch.Tensor, shape: VideoPixelShape) -> None:
        # The last step's estimate is the stage's result: the draft or the clip shows it anyway.
        if stage != PREVIEW_STAGE or step >= total:
            return
        if self.last is not None and time.perf_counter() - self.last < self.every:
            return
        started = time.perf_counter()
        latent = latent_frame(denoised, shape)
        if latent is None:
            log.warning("no preview: the estimate has %d tokens, not one per latent cell", denoised.shape[1])
            self.every = float("inf")
            return
        if self.decoder is None:
            self.decoder = self.run.tracker.watch(self.run.ledger.video_decoder(), "preview decoder")
        # A fixed seed of its own: the job's generator must advance exactly as without previews.
        pixels = self.decoder(latent.to(self.run.dtype), generator=self.noise.manual_seed(0))
        frame = ((pixels[0, :, 0].float() + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).to(torch.uint8)
        array = frame.permute(1, 2, 0).cpu().numpy()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count += 1
        path = self.folder / f"preview-{self.count:04d}.png"
        partial = path.with_name(f".{path.name}.partial")
        Image.fromarray(array).save(partial, format="PNG", compress_level=1)
        partial.replace(path)  # the bot never reads half a file
        seconds = time.perf_counter() - started
        self.run.emit(PreviewEvent(stage=stage, step=step, total=total, path=path, width=array.shape[1],
                                   height=array.shape[0], seconds=round(seconds, 4)))
        self.last = time.perf_counter()

    def close(self) -> None:
        self.decoder = None
