"""Bitwise Self-Correction (Infinity paper, Sec. 3.3): teacher forcing on a corrupted history.

At each scale the residual (latent minus what earlier scales *with their flipped bits* built)
is area-downsampled and binarised: those bits are the labels. A random fraction of them is
then flipped before they are added to the history, so later scales learn to correct earlier
mistakes, as the sampler will need at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.quantizer import BitwiseQuantizer, resample


@dataclass(frozen=True)
class TeacherBatch:
    inputs: torch.Tensor  # (B, L_total - 1, D) next-scale inputs built from the corrupted history
    labels: torch.Tensor  # (B, L_total, D) int64 bits to predict, token layout
    latent: torch.Tensor  # (B, d, H, W) the corrupted history plus the last scale's bits: what a
    # sampler that made these mistakes would hand the decoder


def corrupted_teacher_batch(
    quantizer: BitwiseQuantizer,
    latent: torch.Tensor,
    scales: tuple[tuple[int, int], ...],
    strength: float,
    generator: torch.Generator | None,
    flip_last: bool = False,
) -> TeacherBatch:
    """latent: (B, d, H, W) raw encoder output. strength 0 = plain teacher forcing.

    flip_last also flips the last scale's bits (into `latent` only: nothing follows to correct them,
    as nothing corrects a sampler's last-scale mistakes); the labels stay the corrected bits.
    """
    summed, inputs, labels = None, [], []
    for k, size in enumerate(scales):
        residual = latent if summed is None else latent - summed
        bits = quantizer.binarize(resample(residual, size, "area"))  # (B, h, w, d) labels
        used = bits
        if strength > 0 and (k + 1 < len(scales) or flip_last):
            # One flip probability per scale and batch, uniform over {0, 0.01, ..., strength}.
            steps = round(strength * 100)
            p = torch.randint(0, steps + 1, (), generator=generator).item() / 100
            flips = torch.rand(bits.shape, generator=generator) < p
            used = bits ^ flips.long()
        summed = quantizer.accumulate(summed, quantizer.codes(used, k), scales[-1])
        if k + 1 < len(scales):
            inputs.append(quantizer.next_inputs(summed, scales[k + 1]))
        labels.append(quantizer.to_token_layout(bits.permute(0, 3, 1, 2).float()).long())
    assert summed is not None  # a schedule has at least one scale
    return TeacherBatch(torch.cat(inputs, dim=1), torch.cat(labels, dim=1), summed)
