"""Frozen configurations for the Infinity transformer, the bitwise VAE and sampling.

Named sizes follow the official `run_infinity.py` kwargs; derived values are properties so
that a config is never internally inconsistent. Per-request knobs live in `SamplingParams`,
never on a module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

ScaleValue = float | tuple[float, ...]


def _ffn_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    # Python's round() is banker's rounding: 2080*4/256 = 32.5 -> 32, exactly as the official code.
    return round(width * mlp_ratio / 256) * 256


@dataclass(frozen=True)
class TransformerConfig:
    depth: int  # number of CrossAttnBlocks
    width: int  # embed dim C (= cond dim D)
    num_heads: int  # self- and cross-attention heads
    ffn_hidden: int  # FFN hidden width (official: round(4C/256)*256)
    token_bits: int = 32  # bits per transformer token (2B: 32; 8B: 4*14 = 56 with patchify)
    text_channels: int = 2048  # T5 feature width (flan-t5-xl: 2048)
    text_maxlen: int = 512  # rows of the learned unconditional embedding `cfg_uncond`
    pool_heads: int = 16  # heads of the attentive text pooling (official: text_channels // 128)
    num_levels: int = 15  # rows of `lvl_embed` (one per scale)
    block_chunks: int = 8  # official checkpoints group blocks in chunks: names only
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.width % self.pool_heads:
            raise ValueError(f"width {self.width} is not divisible by pool_heads {self.pool_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for RoPE-2D")
        if self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @property
    def num_params(self) -> int:
        """Parameter count of the module (checked against the official 2B/8B counts in tests)."""
        C, T, d, F = self.width, self.text_channels, self.token_bits, self.ffn_hidden
        top = (
            self.text_maxlen * T
            + C
            + T  # cfg_uncond, pos_start, text_norm
            + C
            + C
            + 2 * C * T
            + C * C
            + C  # pooling: mat_q, v_bias, mat_kv, proj
            + C * T
            + C
            + C * C
            + C  # text_proj_for_ca
            + self.num_levels * C
            + C * d
            + C  # lvl_embed, word_embed
            + 6 * C * C
            + 6 * C
            + 2 * C * C
            + 2 * C  # shared_ada_lin, head_nm
            + 2 * d * C
            + 2 * d
        )  # head
        block = (
            6 * C
            + self.num_heads
            + 2 * C
            + 3 * C * C
            + C * C
            + C  # ada_gss, sa
            + C
            + C * C
            + C
            + 2 * C * C
            + C * C
            + C  # ca
            + C * F
            + F
            + F * C
            + C
            + 2 * C
        )  # ffn, ca_norm
        return top + self.depth * block


def _named(depth: int, width: int, heads: int, chunks: int, **kw: int) -> TransformerConfig:
    return TransformerConfig(
        depth=depth, width=width, num_heads=heads, ffn_hidden=_ffn_hidden(width), block_chunks=chunks, **kw
    )


TRANSFORMER_SIZES: dict[str, TransformerConfig] = {
    "2b": _named(32, 2048, 16, 8),
    "8b": _named(40, 3584, 28, 8, token_bits=56),
    "layer12": _named(12, 768, 8, 4),
    "layer16": _named(16, 1152, 12, 4),
    "layer24": _named(24, 1536, 16, 4),
    "layer32": _named(32, 2080, 20, 4),
    "layer40": _named(40, 2688, 24, 4),
    "layer48": _named(48, 3360, 28, 4),
    # Tiny sizes for tests and CPU benchmarks (same code, same layout).
    "tiny": TransformerConfig(
        depth=2,
        width=64,
        num_heads=2,
        ffn_hidden=256,
        token_bits=8,
        text_channels=32,
        text_maxlen=32,
        pool_heads=1,
        block_chunks=2,
    ),
    "small": TransformerConfig(
        depth=4,
        width=128,
        num_heads=2,
        ffn_hidden=512,
        token_bits=16,
        text_channels=64,
        text_maxlen=64,
        pool_heads=1,
        block_chunks=2,
    ),
    "mid": TransformerConfig(
        depth=8,
        width=512,
        num_heads=8,
        ffn_hidden=2048,
        token_bits=32,
        text_channels=512,
        text_maxlen=128,
        pool_heads=4,
        block_chunks=4,
    ),
}


@dataclass(frozen=True)
class VAEConfig:
    bits: int = 32  # latent channels = bits per latent pixel (vae_type)
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2  # encoder blocks per level; the decoder has one more
    spatial_patchify: bool = False  # 8B: 2x2 latent pixels -> one token of 4*bits bits
    # Magnitude of the codes of scale k: (code_decay ** k) / sqrt(bits). Official checkpoints use 1.0
    # (every scale +-1/sqrt(d)); a short CPU-trained model may use < 1 (see shared notes).
    code_decay: float = 1.0
    # Encoder output squashed to +-latent_bound (bound * tanh(x / bound)); None = official (unbounded).
    # With decaying codes the quantizer can only reach |F_hat| <= sum_k decay^k / sqrt(d); keeping the
    # latent inside that range keeps the straight-through gradient honest when training from scratch.
    latent_bound: float | None = None
    norm_eps: float = 1e-6
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if any(self.base_channels * m % self.norm_groups for m in self.channel_mult):
            raise ValueError(
                f"channels {self.base_channels}x{self.channel_mult} must divide into "
                f"{self.norm_groups} GroupNorm groups"
            )

    @property
    def num_down(self) -> int:
        return len(self.channel_mult) - 1

    @property
    def stride(self) -> int:
        """Pixels per latent pixel."""
        return 2**self.num_down

    @property
    def token_bits(self) -> int:
        """Bits of one transformer token built from this VAE's latent."""
        return self.bits * 4 if self.spatial_patchify else self.bits

    @property
    def pixels_per_token(self) -> int:
        return self.stride * (2 if self.spatial_patchify else 1)

    def reachable(self, num_scales: int) -> float:
        """Largest |value| per channel that `num_scales` scales of codes can sum to."""
        return sum(self.code_scale(k) for k in range(num_scales))

    def code_scale(self, scale_index: int) -> float:
        return self.code_decay**scale_index / math.sqrt(self.bits)


VAE_SIZES: dict[str, VAEConfig] = {
    "d32": VAEConfig(bits=32),  # Infinity-2B, stride 16
    "d14-patchify": VAEConfig(bits=14, channel_mult=(1, 2, 4, 4), spatial_patchify=True),  # 8B
    "d64": VAEConfig(bits=64),
    "tiny": VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
    "tiny-patchify": VAEConfig(bits=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, spatial_patchify=True),
}


def lookup(table: dict[str, TransformerConfig] | dict[str, VAEConfig], name: str):
    """Exact-name registry lookup; an unknown name lists the valid ones."""
    try:
        return table[name]
    except KeyError:
        raise KeyError(f"unknown size {name!r}; valid: {', '.join(sorted(table))}") from None


class ScaleListError(ValueError):
    """A per-scale `cfg` or `tau` list shorter than the schedule; `param` names the field."""

    def __init__(self, param: str, given: int, num_scales: int) -> None:
        super().__init__(f"`{param}` lists {given} values but the schedule has {num_scales} scales")
        self.param = param


# Guidance presets. "full": `cfg` on every scale, as the official sampler. "skip-last": cfg 1 on the
# last scale, where the layout is already fixed (StageVAR and SkipVAR report Infinity's late scales need
# no guidance); the sampler then drops the unconditional rows for that scale. Measured: the 2B at 1M
# counts 1.30x fewer transformer FLOPs; ShapesEval on the default model 0.70 -> 0.71, within its noise
# (docs/benchmarks.md, "Guidance-free late scales"). Per-scale `cfg` lists go further, at a measured cost.
GuidancePreset = Literal["full", "skip-last"]
GUIDANCE_PRESETS: tuple[str, ...] = get_args(GuidancePreset)


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling knobs. `cfg` and `tau` are one value or one value per scale."""

    cfg: ScaleValue = 3.0
    tau: ScaleValue = 0.5
    top_k: int = 0  # 0 = off; 1 = greedy (deterministic, ignores the seed)
    top_p: float = 0.97  # official default: drops a bit value of probability <= 0.03
    seed: int | None = None
    negative_prompt: str | None = None
    guidance: GuidancePreset = "full"  # applied by `for_schedule` once the schedule is known

    def __post_init__(self) -> None:
        for name in ("cfg", "tau"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(math.isfinite(v) for v in values):
                raise ValueError(f"`{name}` must be finite numbers, got {value!r}")
        if any(t <= 0 for t in self._as_tuple(self.tau)):
            raise ValueError(f"`tau` must be > 0, got {self.tau!r}")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be in [0, 1], got {self.top_p}")
        if self.guidance not in GUIDANCE_PRESETS:
            raise ValueError(f"`guidance` must be one of {', '.join(GUIDANCE_PRESETS)}, got {self.guidance!r}")

    @staticmethod
    def _as_tuple(value: ScaleValue) -> tuple[float, ...]:
        return value if isinstance(value, tuple) else (value,)

    def _at(self, name: str, scale_index: int) -> float:
        # No length check here: `check_scales` ran where the schedule met the params (pipeline, server).
        value = getattr(self, name)
        return float(value[scale_index]) if isinstance(value, tuple) else float(value)

    def cfg_at(self, scale_index: int) -> float:
        return self._at("cfg", scale_index)

    def tau_at(self, scale_index: int) -> float:
        return self._at("tau", scale_index)

    def check_scales(self, num_scales: int) -> None:
        """The one rule for per-scale lists: at least one value per scale (extra values are unused).

        Applied where a schedule meets the params: `InfinityPipeline.generate` and the server's
        request handling; raises ScaleListError naming `cfg` or `tau`.
        """
        for name in ("cfg", "tau"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) < num_scales:
                raise ScaleListError(name, len(value), num_scales)

    def for_schedule(self, num_scales: int) -> SamplingParams:
        """The `guidance` preset written out as a per-scale `cfg` (after `check_scales`); "full" is unchanged."""
        if self.guidance == "full":
            return self
        cfg = (*(self.cfg_at(i) for i in range(num_scales - 1)), 1.0)
        return replace(self, cfg=cfg, guidance="full")

    def uses_guidance(self, num_scales: int, start: int = 0) -> bool:
        """Any scale from `start` on has cfg != 1 (guidance needs the unconditional rows there)."""
        return any(self.cfg_at(i) != 1.0 for i in range(start, num_scales))

    def with_seed(self, seed: int) -> SamplingParams:
        return replace(self, seed=seed)


# The choices of a run, each written once: the server's settings and the CLI take theirs from here.
Precision = Literal["float32", "bfloat16", "float16"]  # as a type: pydantic fields validate it
PRECISIONS: tuple[str, ...] = get_args(Precision)

# Kernel of cross-attention and of the text pooling (model/attention.py) -> what its numbers match.
# Self-attention is exact SDPA in every mode. The official code sends cross-attention and the pooling
# through flash-attn, which rounds q, k, v and the output to bf16 even in a float32 run; bf16 rounding
# is chaotic (a 1e-7 difference can move a value by one bf16 step), so rounding "as the official code
# does" does not give its bits either (measured on tiny official-format models, float32).
AttentionChoice = Literal["auto", "sdpa", "sdpa-bf16io", "flash"]
ATTENTION_CHOICES: tuple[str, ...] = get_args(AttentionChoice)
ATTENTION_MODES: dict[str, str] = {
    "auto": "sdpa on CPU; on CUDA, flash when flash-attn is installed, else sdpa-bf16io",
    "sdpa": (
        "exact torch SDPA. In float32 (and batch-invariant, the default) it reproduces the official model's "
        "float32 math bit for bit (the official code without its bf16 casts), not the official code as "
        "written, which rounds to bf16"
    ),
    "sdpa-bf16io": (
        "torch SDPA with q, k, v and the output rounded to bf16, as the official code as written "
        "rounds them. Still not its bits: the first bits differ at scale 2 to 6 (99.4-99.99% equal). "
        "Never faster than sdpa: it rounds, then computes in float32"
    ),
    "flash": (
        "flash-attn varlen kernels (CUDA, flash-attn installed; bf16/fp16 in and out), the kernel the "
        "official code calls. Not compared bit for bit with it"
    ),
}
assert tuple(ATTENTION_MODES) == ATTENTION_CHOICES, "describe each attention choice"

# torch.compile modes of the transformer blocks; "reduce-overhead" adds CUDA graphs on CUDA.
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


# How stream previews are made (model/preview.py): "auto" is the model's trained preview decoder when it
# ships one (the default model does: ~1.1x a plain request, 26.5 dB at the last scale), else the real
# decoder; "fast" is that trained decoder, else a per-pixel linear map fitted from the VAE decoder when the
# pipeline is built (cheap, but below a flat colour in PSNR); "decoder" a full decode per preview.
PreviewMode = Literal["auto", "fast", "decoder"]
PREVIEW_MODES: tuple[str, ...] = get_args(PreviewMode)


# The VAE decode: "fast" (model/fast_decoder.py: the official decoder's function with its upsampling
# folded into transposed convolutions, channels-last, ~1.6x faster on CPU in float32, pixels within a
# small fraction of a level) or "reference" (the official module graph as written).
VaeDecodeMode = Literal["fast", "reference"]
VAE_DECODE_MODES: tuple[str, ...] = get_args(VaeDecodeMode)


def default_precision(device: str) -> Precision:
    """The dtype of a run that names none: bfloat16 on CUDA (as the official run), float32 elsewhere."""
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a pipeline runs. Devices and dtypes come from here, never from model code."""

    device: str = "cpu"
    dtype: Precision = "float32"  # compute dtype of the transformer blocks and the VAE
    text_dtype: Precision | None = None  # T5 dtype; None = float16 on CUDA, float32 elsewhere
    attention: AttentionChoice = "auto"  # cross-attention kernel; what each matches: ATTENTION_MODES
    # torch.compile of each transformer block ("regional": one graph serves every block), dynamic
    # shapes so scales and batch sizes do not recompile. "reduce-overhead" adds CUDA graphs on CUDA.
    # Off by default: the first batch pays the compile (a warm-up at start-up does it).
    compile: CompileMode = "off"
    # A seed gives the same image whatever shares its batch: each batch row gets GEMMs of its own
    # shape (see model/invariance.py). Off trades that for one GEMM per layer. The pipeline sets it on
    # its own transformer, so pipelines with different settings can share a process.
    batch_invariant: bool = True
    # Stream previews (PreviewMode above; docs/benchmarks.md): "auto" uses a trained preview decoder when
    # the model ships one, else the real decoder (about one final decode per preview). Final images
    # always come from the real decoder.
    preview: PreviewMode = "auto"
    vae_decode: VaeDecodeMode = "fast"  # final images (and decoder previews): VAE_DECODE_MODES above
