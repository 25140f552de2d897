"""Our modules -> the official state-dict layout (for exporting and for official-layout test files)."""

from __future__ import annotations

import torch
import torch.nn as nn

from model.transformer import Infinity
from model.vae import BitwiseVAE
from weights.io import StateDict
from weights.keymap import official_transformer_name


def official_transformer_state(model: Infinity) -> StateDict:
    """Names as `infinity_2b_reg.pth` has them, including the all-zero K bias buffers."""
    k = model.config.blocks_per_chunk
    out = {official_transformer_name(n, k): t for n, t in model.state_dict().items()}
    for i, block in enumerate(model.blocks):
        for attn in ("sa", "ca"):
            name = official_transformer_name(f"blocks.{i}.{attn}.zero_k_bias", k)
            out[name] = torch.zeros_like(getattr(block, attn).v_bias)
    out["text_proj_for_sos.ca.zero_k_bias"] = torch.zeros_like(model.text_proj_for_sos.ca.v_bias)
    return out


def official_vae_state(vae: BitwiseVAE) -> StateDict:
    """Names with the official wrapper levels (`conv_in.conv.weight`) and the two `mask` buffers."""
    wrapper = {}
    for name, module in vae.named_modules():
        if isinstance(module, nn.Conv2d):
            wrapper[name] = "conv"
        elif isinstance(module, nn.GroupNorm):
            wrapper[name] = "norm"
    out = {}
    for name, tensor in vae.state_dict().items():
        owner, leaf = name.rsplit(".", 1)
        out[f"{owner}.{wrapper[owner]}.{leaf}"] = tensor
    d = vae.config.bits
    mask = 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64)
    out["quantizer.lfq.mask"] = mask
    out["quantize.lfq.mask"] = mask.clone()
    return out
