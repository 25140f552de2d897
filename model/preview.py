"""Cheap stream previews: a per-pixel linear map latent -> RGB, fitted once from the real VAE decoder.

A full decode per preview costs as much as the final image's decode; a request streaming every
scale's preview paid it once per scale (1.9x a plain request on the default model). The map is
a 1x1 convolution (d channels -> RGB, plus a bias) applied at the latent's own resolution, then
upsampled bilinearly to the image size, so previews keep the final image's size.

The map is fitted by least squares when a pipeline is built, with no data and no training:
seeded random bits over a small scale schedule, accumulated by the VAE's own quantizer exactly
as the sampler accumulates them (every partial sum, as previews see them), decoded by the real
decoder. The fit minimises the squared pixel error of the upsampled preview: bilinear upsampling
and a per-pixel affine map commute (the interpolation weights sum to one), so fitting on
upsampled latents against decoded pixels is fitting the preview itself. The map is per pixel,
so a small fitting size serves every image size. Final images never use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.vae import BitwiseVAE

FIT_SEED = 0
FIT_IMAGES = 8  # random latents per partial sum; 8 x 4 decodes of an 8x8 latent
FIT_SCALES: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 4), (8, 8))  # latent size of each scale


@dataclass(frozen=True)
class LinearPreview:
    """RGB in [-1, 1] = weight @ latent + bias, per latent pixel, upsampled by `stride`."""

    weight: torch.Tensor  # (3, d) float32, on the pipeline's device
    bias: torch.Tensor  # (3,) float32
    stride: int  # image pixels per latent pixel

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, h, w) -> preview in [-1, 1] (B, 3, h*stride, w*stride) float32.

        One image at a time, like the real decode: a row's preview never depends on its batch."""
        assert latent.ndim == 4 and latent.shape[1] == self.weight.shape[1], tuple(latent.shape)
        size = (latent.shape[2] * self.stride, latent.shape[3] * self.stride)
        rows = [latent.new_zeros(0, 3, *size, dtype=torch.float32)]  # torch.cat of no rows
        for z in latent.float():  # (d, h, w)
            rgb = torch.einsum("rc,chw->rhw", self.weight, z) + self.bias[:, None, None]  # (3, h, w)
            rows.append(F.interpolate(rgb[None], size=size, mode="bilinear", align_corners=False))
        return torch.cat(rows).clamp_(-1, 1)

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
