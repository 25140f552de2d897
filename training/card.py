"""The default model's card: what it was trained on, its sizes, its time and its scores."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from training.evaluate import EvalReport
from training.recipe import IMAGE_SIZE, Recipe
from training.shapes import BACKGROUNDS, COLOURS, HELD_OUT, JITTER, SHAPES, TEMPLATES

TARGETS = {"single colour": 0.95, "single": 0.80, "two": 0.50, "overall": 0.60}  # the bars


def limits_paragraph(report: EvalReport, split: str) -> str:
    """Which of the targets these scores meet, in words (the card never claims more than measured)."""
    verdicts = [
        f"{name} {report.accuracy.get(name, 0.0):.2f} (target {bar:.2f}, "
        f"{'met' if report.accuracy.get(name, 0.0) >= bar else 'not met'})"
        for name, bar in TARGETS.items()
    ]
    missed = any(report.accuracy.get(name, 0.0) < bar for name, bar in TARGETS.items())
    head = "Known limits: the targets are **not all met**" if missed else "All targets are met"
    return f"{head} ({split}): " + "; ".join(verdicts) + "."


def _weighting(name: str) -> str:
    official = "the official reweight_loss_by_scale (1/sqrt(h*w) at an h x w scale)"
    return {"uniform": "uniform", "sqrt_area": official}[name]


def _flips(fraction: float) -> str:
    if not fraction:
        return ""
    return (
        f", corrupted as bitwise self-correction corrupts them (up to {fraction:.0%} of each scale's bits "
        "flipped), so that it draws clean shapes from a sampler's imperfect bits"
    )


def _layout(layout: str) -> str:
    if layout == "free":
        return "free layouts (objects anywhere they fit)"
    return (
        f"composed layouts (objects where the caption reads them: one centred, a pair or three left to right "
        f"in caption order, four in a 2x2 grid; up to {JITTER:.0%} jitter), so it always draws a lone object near "
        f"the centre and named objects left to right"
    )


def _text_encoder(meta: dict, r: Recipe) -> str:
    words = (
        f"T5 encoder {r.t5.num_layers} layers x {r.t5.d_model}, word-level tokenizer over the training "
        "captions' words (words only the held-out templates use are unknown to it)"
    )
    if not meta.get("grounding_steps"):
        return words + "; trained jointly with"
    return (
        words + f"; first trained alone {meta['grounding_steps']} steps to read each caption's objects in "
        f"reading order (colour, shape, arrangement), then jointly, that loss kept at weight "
        f"{r.grounding.joint_weight}, with"
    )


def _preview(weights: Path, r: Recipe) -> str:
    if not (weights / "preview_decoder.safetensors").exists():
        return ""
    p = r.preview
    return (
        f"- Stream previews (`INFINITY_PREVIEW=fast`): preview_decoder.safetensors, a TAESD-style decoder "
        f"({p.blocks + 1} 3x3 convolutions {p.width} wide at the latent's resolution, one at twice it, pixel "
        f"shuffle) trained {p.steps} steps against the VAE decoder on every partial sum of {p.scenes} encoded "
        f"scenes' bits (up to {p.flip:.0%} flipped); `python -m training.preview_decoder`.\n"
    )


def write_card(
    path: Path, weights: Path, report: EvalReport, split: str, vae_psnr: float, ceiling: EvalReport | None = None
) -> None:
    r = Recipe()
    meta = json.loads((weights / "schedule.json").read_text())
    sizes = {p.name: p.stat().st_size for p in weights.rglob("*") if p.is_file()}
    section = f"## Scores ({split}, {report.count} prompts per category)\n\n{report.table(ceiling)}\n"
    if ceiling is not None:
        section += (
            "\nVAE ceiling: the same scenes' own renders encoded to bits and decoded, scored the same way "
            "(what a transformer that predicted every bit right would score).\n"
        )
    previous = path.read_text() if path.exists() else ""
    scores = {s.split("\n", 1)[0]: s for s in previous.split("\n## ")[1:] if s.startswith("Scores")}
    scores[section.split("\n", 1)[0][3:]] = section[3:]
    t, v, tt, vt = r.transformer, r.vae, r.transformer_training, r.vae_training
    previews = _preview(weights, r)
    minutes = meta.get("training_minutes_total", meta.get("training_minutes", "?"))
    vae_steps, decoder_steps = meta.get("vae_steps", vt.steps), meta.get("decoder_steps", 0)
    transformer_steps, weighting = meta.get("transformer_steps", tt.steps), meta.get("scale_weighting", "uniform")
    body = f"""# infinity-default: the embedded default model

A small Infinity (same code as the official models) trained from scratch on this project's
procedural shapes dataset, so that `serve` and `generate` give real, prompt-following images with
no download. It only knows its domain: {len(SHAPES)} shapes ({", ".join(SHAPES)}), {len(COLOURS)} colours
({", ".join(COLOURS)}), {len(BACKGROUNDS)} dark backgrounds, 1 to 4 objects, counts, relative positions.

- Data: generated on the fly, deterministic by seed (`training/shapes.py`); captions from
  {sum(len(v) for v in TEMPLATES.values())} templates over 6 categories, {len(HELD_OUT)} held out of training.
  Layouts: the VAE trained on {_layout(meta.get("vae_layout", "free"))}, the transformer on
  {_layout(meta.get("transformer_layout", "free"))}.
- Images: {IMAGE_SIZE}x{IMAGE_SIZE}; schedule {meta["scales"]} (a non-official 6-scale schedule, 130 tokens).
- VAE: bitwise, stride {v.stride}, {v.bits} bits per latent pixel, channels {v.base_channels}x{list(v.channel_mult)},
  code magnitude 0.6^k/sqrt(d) at scale k; then the decoder alone trained {decoder_steps} more steps on the
  frozen encoder's bits{_flips(meta.get("decoder_flip", 0.0))} (same bits, so the transformer's targets do not change);
  held-out PSNR {vae_psnr:.2f} dB (decoded from clean bits).
- Transformer: depth {t.depth}, width {t.width}, {t.num_heads} heads, {t.token_bits}-bit tokens;
  {_text_encoder(meta, r)} bitwise self-correction (flip up to {tt.bsc_strength:.0%} of the bits per scale) and
  {tt.text_dropout:.0%} null-prompt rows; loss weights per token: {_weighting(weighting)}; EMA weights.
- Training: `infinity-serve train-default` on a 2-core CPU, {minutes}
  minutes in all: VAE {vae_steps} steps of {vt.batch} images, transformer {transformer_steps} steps of {tt.batch}.
{previews}- Files: {", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(sizes.items()) if v > 100_000)} (float16).
- Sampling for the scores: cfg 3, tau 1, top-p 0.97, one seed per prompt; `infinity-serve eval`.

{limits_paragraph(report, split)}

"""
    path.write_text(body + "\n\n".join(f"## {s.strip()}" for s in scores.values()) + "\n")


def sample_grid(pipe, schedule, path: Path, columns: int = 4, rows: int = 4, zoom: int = 3, seed: int = 7) -> list[str]:
    """Generate one image per prompt (one per category and more) and save a captioned grid PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    from model.config import SamplingParams
    from training.evaluate import eval_scenes

    per_category = -(-columns * rows // 6)
    scenes = eval_scenes(per_category, held_out=False)
    picked = [scenes[c * per_category + i] for i in range(per_category) for c in range(6)][: columns * rows]
    prompts = [s.caption for s in picked]
    params = [SamplingParams(cfg=3.0, tau=1.0, seed=seed + i) for i in range(len(prompts))]
    result = pipe.generate(prompts, schedule, params)
    images = result.images  # one per row in result.rows: a non-finite row has none
    cell_w, cell_h = images[0].shape[1] * zoom, images[0].shape[0] * zoom
    caption_h = 34
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, row) in enumerate(zip(images, result.rows, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + caption_h)
        grid.paste(Image.fromarray(np.asarray(image)).resize((cell_w, cell_h), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(prompts[row], width=cell_w // 6)[:2]
        draw.multiline_text((x + 4, y + cell_h + 2), "\n".join(lines), fill=(0, 0, 0))
    grid.save(path)
    return prompts
