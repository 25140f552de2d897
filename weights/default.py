"""The embedded default model: what `serve` and `generate` use when no weights are configured.

Its files live in `weights/default/` (transformer.safetensors, vae.safetensors, text_encoder/, and
optionally preview_decoder.safetensors for "fast" stream previews).
Until the trained default model ships there, a tiny *random* model stands in, and every start
says so loudly: its images are noise, not prompt-following pictures.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model.config import TRANSFORMER_SIZES, VAE_SIZES, RuntimeConfig
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.t5_builder import build_t5_encoder_dir
from model.text_encoder import T5TextEncoder
from weights.loader import build_transformer, build_vae
from weights.pipeline import load_pipeline
from weights.preview import PREVIEW_FILE
from weights.text_encoders import TextEncoders

log = logging.getLogger(__name__)

DEFAULT_DIR = Path(__file__).parent / "default"


@dataclass(frozen=True)
class DefaultModel:
    name: str
    default_pn: str
    max_pn: str
    placeholder: bool  # True: random weights, not a trained model
    schedule: ScaleSchedule | None = None  # the only schedule the model was trained for, if any


def default_files_present(root: Path = DEFAULT_DIR) -> bool:
    names = ("transformer.safetensors", "vae.safetensors", "text_encoder", "schedule.json")
    return all((root / n).exists() for n in names)


def load_default_pipeline(
    runtime: RuntimeConfig, root: Path = DEFAULT_DIR, text_encoders: TextEncoders | None = None
) -> tuple[InfinityPipeline, DefaultModel]:
    if default_files_present(root):
        previews = root / PREVIEW_FILE if (root / PREVIEW_FILE).exists() else None  # else a fitted linear map
        files = root / "transformer.safetensors", root / "vae.safetensors", root / "text_encoder"
        pipe = load_pipeline(*files, runtime, previews, text_encoders)
        scales = tuple(tuple(s) for s in json.loads((root / "schedule.json").read_text())["scales"])
        log.info("embedded default model from %s (trained on the shapes domain, schedule %s)", root, scales)
        return pipe, DefaultModel(
            "infinity-default", "0.06M", "0.06M", placeholder=False, schedule=ScaleSchedule.custom(scales)
        )
    log.warning(
        "NO WEIGHTS CONFIGURED and no trained default model in %s: serving a TINY RANDOM model. "
        "Its images are noise. Configure --transformer/--vae/--text-encoder for real images.",
        root,
    )
    t5_dir = build_t5_encoder_dir(
        Path(tempfile.mkdtemp(prefix="infinity-t5-")), ["a"], d_model=TRANSFORMER_SIZES["tiny"].text_channels
    )
    encoder = T5TextEncoder.from_dir(t5_dir, runtime.device, max_length=TRANSFORMER_SIZES["tiny"].text_maxlen)
    pipe = InfinityPipeline(
        build_transformer(TRANSFORMER_SIZES["tiny"]), build_vae(VAE_SIZES["tiny"]), encoder, runtime
    )
    return pipe, DefaultModel("infinity-tiny-random", "0.06M", "0.25M", placeholder=True)
