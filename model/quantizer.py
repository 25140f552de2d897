"""Multi-scale bitwise spherical quantization (BSQ): latent <-> bits per scale.

Conventions (official): bit 1 <-> code +s, bit 0 <-> -s on latent channel c = bit c, with
s = 1/sqrt(d). The decoded latent is the sum of every scale's codes upsampled (bilinear,
align_corners=False) to the final size; the next scale's transformer input is a bilinear
*down*-sample of that sum. Encoding downsamples the residual with *area*. Resampling uses the
official 5-D "trilinear" calls on a T=1 volume: identical maths to bilinear, identical floats.
Bits tensors are channels-last: latent layout (B, h, w, d); token layout (B, h, w, D) where
D = 4d under 2x2 spatial patchify (8B), else D = d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import VAEConfig


def resample(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(B, d, h, w) -> (B, d, *size) through a T=1 volume, as the official code does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return F.interpolate(x.unsqueeze(2), size=(1, *size), mode="trilinear").squeeze(2)
    return F.interpolate(x.unsqueeze(2), size=(1, *size), mode="area").squeeze(2)


@dataclass(frozen=True)
class EncodedBits:
    bits: list[torch.Tensor]  # per scale (B, h_k, w_k, d) in latent layout, int64 {0, 1}
    quantized: torch.Tensor  # (B, d, H, W): the latent the decoder sees


@dataclass(frozen=True)
class BitwiseQuantizer:
    config: VAEConfig

    # ---- layouts ----------------------------------------------------------------------------
    def to_latent_layout(self, token_bits: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) -> (B, h', w', d); patchify: token bit c*4 + 2i + j -> channel c at (2y+i, 2x+j)."""
        if not self.config.spatial_patchify:
            return token_bits
        return F.pixel_shuffle(token_bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)

    def to_token_layout(self, latent: torch.Tensor) -> torch.Tensor:
        """Channels-first latent (B, d, h', w') -> tokens (B, h*w, D) in row-major order."""
        if self.config.spatial_patchify:
            latent = F.pixel_unshuffle(latent, 2)
        return latent.flatten(2).transpose(1, 2)

    # ---- bits <-> codes ---------------------------------------------------------------------
    def codes(self, bits: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Bits (B, h, w, d) -> codes (B, d, h, w) float32 of magnitude code_scale(scale_index)."""
        s = 1.0 / self.config.bits**0.5
        codes = F.normalize((bits.float() * 2 - 1) * s, dim=-1)  # +-1/sqrt(d), as official
        if self.config.code_decay != 1.0:
            codes = codes * self.config.code_decay**scale_index
        return codes.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def binarize(residual: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> bits (B, h, w, d): strictly positive after l2-normalisation -> 1."""
        return (F.normalize(residual, dim=1) > 0).long().permute(0, 2, 3, 1)

    # ---- accumulation (sampling and teacher forcing share this) -------------------------------
    @staticmethod
    def accumulate(summed: torch.Tensor | None, codes: torch.Tensor, final: tuple[int, int]) -> torch.Tensor:
        """summed (B, d, H, W) += codes upsampled to the final size."""
        up = resample(codes, final, "bilinear")
        return up if summed is None else summed + up

    def next_inputs(self, summed: torch.Tensor, next_size: tuple[int, int]) -> torch.Tensor:
        """Transformer inputs of the next scale: (B, l_next, D) float32."""
        return self.to_token_layout(resample(summed, next_size, "bilinear"))

    def teacher_inputs(self, bits: list[torch.Tensor], vae_scales: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Bits of every scale (latent layout) -> inputs of scales 1..K-1, (B, L_total - 1, D)."""
        summed, inputs = None, []
        for k, b in enumerate(bits[:-1]):
            summed = self.accumulate(summed, self.codes(b, k), vae_scales[-1])
            inputs.append(self.next_inputs(summed, vae_scales[k + 1]))
        return torch.cat(inputs, dim=1)

    def bits_to_latent(self, bits: list[torch.Tensor], vae_scales: tuple[tuple[int, int], ...]) -> torch.Tensor:
        if not bits:
            raise ValueError("`bits` must hold at least one scale, got none")
        summed = None
        for k, b in enumerate(bits):
            summed = self.accumulate(summed, self.codes(b, k), vae_scales[-1])
        assert summed is not None  # bits is not empty
        return summed

    def encode(self, latent: torch.Tensor, vae_scales: tuple[tuple[int, int], ...]) -> EncodedBits:
        """Residual multi-scale quantization of an encoder latent (B, d, H, W)."""
        if tuple(latent.shape[-2:]) != tuple(vae_scales[-1]):
            raise ValueError(f"latent {tuple(latent.shape[-2:])} != final scale {vae_scales[-1]}")
        residual, summed, all_bits = latent.float(), None, []
        for k, size in enumerate(vae_scales):
            bits = self.binarize(resample(residual, size, "area"))
            up = resample(self.codes(bits, k), vae_scales[-1], "bilinear")
            residual = residual - up
            summed = up if summed is None else summed + up
            all_bits.append(bits)
        assert summed is not None  # vae_scales[-1] above: at least one scale
        return EncodedBits(all_bits, summed)
