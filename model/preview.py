"""Cheap stream previews: the accumulated latent -> RGB without the real VAE decoder.

A full decode per preview costs as much as the final image's decode; a request streaming every
scale's preview paid it once per scale (2.09x a plain request on the default model). Two cheap
stand-ins, both per image (a row's preview never depends on its batch) and both returning the final
image's size. Final images never use them.

- `PreviewDecoder`, TAESD-style: a few 3x3 convolutions at the latent's own resolution, one at twice
  it, then a 1x1 projection to each pixel's patch of RGB (pixel shuffle). Trained against the real
  decoder on the partial sums that previews see (training/preview_decoder.py); shipped for the
  default model (weights/default/preview_decoder.safetensors, loaded by weights/preview.py).
- `LinearPreview`, for VAEs with no trained preview decoder (the official ones): a per-pixel linear
  map (d channels -> RGB, plus a bias) at the latent's resolution, upsampled bilinearly, fitted by least
  squares when a pipeline is built, with no data and no training: seeded random bits over a small scale
  schedule, accumulated by the VAE's own quantizer exactly as the sampler accumulates them (every
  partial sum), decoded by the real decoder. Bilinear upsampling and a per-pixel affine map commute
  (the interpolation weights sum to one), so fitting on upsampled latents against decoded pixels is
  fitting the preview itself. Random bits are off the sampler's distribution, and a linear map cannot
  draw an edge inside a latent pixel: on the default model it scores below a flat colour (the
  preview benchmark), so it is a fallback only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.vae import BitwiseVAE

FIT_SEED = 0
FIT_IMAGES = 8  # random latents per partial sum; 8 x 4 decodes of an 8x8 latent
FIT_SCALES: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 4), (8, 8))  # latent size of each scale


class Previewer(Protocol):
    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, h, w) -> preview in [-1, 1] (B, 3, h*stride, w*stride) float32."""
        ...


def _per_image(latent: torch.Tensor, stride: int, one: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `one` ((1, d, h, w) -> (1, 3, H, W)) to each image: kernels round differently at other
    batch sizes, and a row's preview must not depend on what else shares its batch."""
    size = (latent.shape[2] * stride, latent.shape[3] * stride)
    rows = [latent.new_zeros(0, 3, *size, dtype=torch.float32)]  # torch.cat of no rows
    rows += [one(z[None]).float() for z in latent]
    return torch.cat(rows).clamp_(-1, 1)


@dataclass(frozen=True)
class PreviewDecoderConfig:
    bits: int  # latent channels d, as the VAE's
    stride: int  # image pixels per latent pixel, as the VAE's (even)
    width: int = 64  # channels of the convolutions at the latent's resolution
    blocks: int = 2  # residual 3x3 convolutions after the first (each widens the view by one latent pixel)
    fine_width: int = 16  # channels at twice the latent's resolution (one 3x3 convolution there)

    def __post_init__(self) -> None:
        for name in ("bits", "stride", "width", "fine_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.blocks < 0:
            raise ValueError(f"`blocks` must be at least 0, got {self.blocks}")
        if self.stride % 2:
            raise ValueError(f"`stride` must be even, got {self.stride}")


class PreviewDecoder(nn.Module):
    """Latent (B, d, h, w) -> RGB (B, 3, h*stride, w*stride), unclamped.

    Most of the work at (h, w), where each latent pixel sees 2 * (blocks + 1) + 1 of them around it;
    one 3x3 convolution at (2h, 2w), enough to place an edge inside a latent pixel (measured: 1.5 dB
    more at the last scale than projecting straight from (h, w)); then each fine pixel's
    stride/2 x stride/2 patch by a 1x1 projection and pixel shuffle, as TAESD-style previews do."""

    def __init__(self, config: PreviewDecoderConfig) -> None:
        super().__init__()
        self.config = config
        c, f = config.width, config.fine_width
        self.conv_in = nn.Conv2d(config.bits, c, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(config.blocks))
        self.to_fine = nn.Conv2d(c, 4 * f, 1)
        self.fine = nn.Conv2d(f, 2 * f, 3, padding=1)
        self.conv_out = nn.Conv2d(2 * f, 3 * (config.stride // 2) ** 2, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(latent)  # (B, width, h, w)
        for conv in self.blocks:
            h = h + conv(F.silu(h))
        h = F.pixel_shuffle(self.to_fine(F.silu(h)), 2)  # (B, fine_width, 2h, 2w)
        h = self.fine(F.silu(h))  # (B, 2 * fine_width, 2h, 2w)
        return F.pixel_shuffle(self.conv_out(F.silu(h)), self.config.stride // 2)  # (B, 3, h*s, w*s)

    @torch.inference_mode()
    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        assert latent.ndim == 4 and latent.shape[1] == self.config.bits, tuple(latent.shape)
        return _per_image(latent.to(self.conv_in.weight.dtype), self.config.stride, self)


@dataclass(frozen=True)
class LinearPreview:
    """RGB in [-1, 1] = weight @ latent + bias, per latent pixel, upsampled by `stride`."""

    weight: torch.Tensor  # (3, d) float32, on the pipeline's device
    bias: torch.Tensor  # (3,) float32
    stride: int  # image pixels per latent pixel

    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        assert latent.ndim == 4 and latent.shape[1] == self.weight.shape[1], tuple(latent.shape)
        return _per_image(latent.float(), self.stride, self._one)

    def _one(self, z: torch.Tensor) -> torch.Tensor:
        """(1, d, h, w) -> (1, 3, h*stride, w*stride)."""
        rgb = torch.einsum("rc,bchw->brhw", self.weight, z) + self.bias[:, None, None]  # (1, 3, h, w)
        size = (z.shape[2] * self.stride, z.shape[3] * self.stride)
        return F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)

    @classmethod
    @torch.inference_mode()
    def fit(cls, vae: BitwiseVAE, seed: int = FIT_SEED) -> LinearPreview:
        """Least squares against `vae`'s decoder on seeded random partial sums (see the module doc)."""
        q, d = vae.quantizer, vae.config.bits
        device = vae.decoder.conv_in.weight.device
        generator = torch.Generator().manual_seed(seed)  # CPU: the same bits on every device
        bits = [torch.randint(0, 2, (FIT_IMAGES, h, w, d), generator=generator) for h, w in FIT_SCALES]
        gram = torch.zeros(d + 1, d + 1, dtype=torch.float64)  # normal equations, one partial sum at a time
        cross = torch.zeros(d + 1, 3, dtype=torch.float64)
        summed = None
        for k, b in enumerate(bits):
            summed = q.accumulate(summed, q.codes(b.to(device), k), FIT_SCALES[-1])  # (N, d, 8, 8)
            target = vae.decode(summed)  # (N, 3, H, W)
            up = F.interpolate(summed, size=target.shape[-2:], mode="bilinear", align_corners=False)
            x = up.permute(0, 2, 3, 1).reshape(-1, d).double().cpu()  # (N*H*W, d)
            x = torch.cat((x, torch.ones(len(x), 1, dtype=torch.float64)), dim=1)
            y = target.permute(0, 2, 3, 1).reshape(-1, 3).double().cpu()  # (N*H*W, 3)
            gram += x.T @ x
            cross += x.T @ y
        solution = torch.linalg.lstsq(gram, cross).solution.float()  # (d + 1, 3)
        return cls(solution[:d].T.contiguous().to(device), solution[d].to(device), vae.config.stride)
