"""The bitwise VAE's convolutional encoder and decoder (official architecture, no attention).

Module names mirror the official state dict without its wrapper levels (`conv_in.conv.weight`
there is `conv_in.weight` here; weights/keymap.py maps both spellings).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import VAEConfig
from model.quantizer import BitwiseQuantizer


def _norm(channels: int, config: VAEConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, config: VAEConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cin, config)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, config)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Resnet blocks of one resolution, then an optional resampler (`downsample` or `upsample`)."""

    def __init__(self, blocks: list[ResnetBlock], resampler_name: str | None, resampler: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resampler_name = resampler_name
        if resampler_name is not None:
            self.add_module(resampler_name, resampler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        return x if self.resampler_name is None else getattr(self, self.resampler_name)(x)


class Mid(nn.Module):
    def __init__(self, channels: int, config: VAEConfig) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """RGB in [-1, 1] (B, 3, H, W) -> raw latent (B, d, H/stride, W/stride)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, cin = [], ch
        for i, m in enumerate(mult):
            cout = ch * m
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, config) for j in range(config.num_res_blocks)]
            down = i < config.num_down
            levels.append(Level(blocks, "downsample" if down else None, Downsample(cout) if down else None))
            cin = cout
        self.down = nn.ModuleList(levels)
        self.mid = Mid(cin, config)
        self.norm_out = _norm(cin, config)
        self.conv_out = nn.Conv2d(cin, config.bits, 3, padding=1)
        self.latent_bound = config.latent_bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        if self.latent_bound is not None:
            h = self.latent_bound * torch.tanh(h / self.latent_bound)
        return h


class Decoder(nn.Module):
    """Latent (B, d, h, w) -> RGB (B, 3, h*stride, w*stride), unclamped."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.base_channels, config.channel_mult
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.bits, top, 3, padding=1)
        self.mid = Mid(top, config)
        levels: list[Level] = [None] * len(mult)  # type: ignore[list-item]
        cin = top
        for i in reversed(range(len(mult))):  # built (and run) from the coarsest level down
            cout = ch * mult[i]
            blocks = [ResnetBlock(cin if j == 0 else cout, cout, config) for j in range(config.num_res_blocks + 1)]
            up = i > 0
            levels[i] = Level(blocks, "upsample" if up else None, Upsample(cout) if up else None)
            cin = cout
        self.up = nn.ModuleList(levels)  # index = resolution level, as the official names
        self.norm_out = _norm(cin, config)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BitwiseVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = BitwiseQuantizer(config)
        self._fast_decoder: nn.Module | None = None  # see use_fast_decoder

    def use_fast_decoder(self, enabled: bool = True) -> None:
        """Decode through model/fast_decoder.py from now on (or, disabled, through the official graph):
        the same function, ~1.5x faster on CPU in float32. Inference only; call once the decoder has its
        final device and dtype (the pipeline does, with RuntimeConfig.vae_decode)."""
        from model.fast_decoder import FastDecoder  # it builds on this module's classes

        # Kept out of the module tree: the VAE's state dict keeps exactly the official keys.
        self.__dict__["_fast_decoder"] = FastDecoder(self.decoder) if enabled else None

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> image in [-1, 1] (B, 3, H, W) float32."""
        z = latent.to(self.decoder.conv_in.weight.dtype)
        decoder = self.decoder if self._fast_decoder is None else self._fast_decoder
        return decoder(z).float().clamp_(-1, 1)

    def encode_bits(self, images: torch.Tensor, vae_scales: tuple[tuple[int, int], ...]):
        """Images in [-1, 1] (B, 3, H, W) -> EncodedBits over the given latent scales."""
        return self.quantizer.encode(self.encode_latent(images), vae_scales)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> the encoder's raw latent (B, d, h, w) float32, before bits."""
        return self.encoder(images.to(self.encoder.conv_in.weight.dtype)).float()

    def reconstruct(self, images: torch.Tensor, vae_scales: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Images -> bits -> images in [-1, 1]: the round trip a sampler's perfect bits would take."""
        bits = self.encode_bits(images, vae_scales).bits
        return self.decode(self.quantizer.bits_to_latent(bits, vae_scales))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, H, W) -> RGB uint8 (B, H, W, 3); truncation like the official cast."""
    return ((images + 1) / 2).permute(0, 2, 3, 1).mul(255).to(torch.uint8)
