"""Image-to-image on the shipped default model: what bit forcing keeps and what it changes.

    python -m tests.bench.img2img_bench [--cases 54] [--grid docs/img2img.png]

Inputs are rendered scenes of the training domain (training/shapes.py, exact colours and shapes), so
the ShapesEval detector (training/detector.py) can judge every output.

1. strength 0: the output equals the VAE round trip of the input, pixel for pixel (count of cases).
2. Masked edits: a scene with object A on the left (and B on the right), the right half masked, and a
   prompt that adds an object there (no B in the input), recolours B, or replaces B. Per case: PSNR of
   the kept left half against the input (pure decode and pasted back), the same for the plain VAE
   round trip, whether the edited half holds the prompt's new object (colour and shape, centre right
   of the middle) and whether A survived on the left.
3. Variations without a prompt: at each strength, how often the output has the input's object count
   and colours (detector on both).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import RuntimeConfig, SamplingParams
from model.image_condition import PASTE_FEATHER, ImageCondition, feathered_paste
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.vae import to_uint8
from training.detector import detect
from training.shapes import BACKGROUNDS, COLOURS, SHAPES, Obj, Scene, make_scene, render
from weights.default import load_default_pipeline

SIZE = 64
KINDS = ("add", "recolour", "replace")
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def round_trip(pipe: InfinityPipeline, image: np.ndarray, scales: tuple[tuple[int, int], ...]) -> np.ndarray:
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        return to_uint8(pipe.vae.reconstruct(pixels, scales))[0].numpy()


def edit_case(rng: random.Random, kind: str) -> tuple[Scene, str, tuple[str, str]]:
    """(input scene, edit prompt, (colour, shape) the right half should then hold)."""
    colours = list(COLOURS)
    ca, cb, cc = rng.sample(colours, 3)
    sa, sb, sc = rng.choice(SHAPES), rng.choice(SHAPES), rng.choice(SHAPES)
    a = Obj(sa, ca, 0.27, 0.5 + rng.uniform(-0.1, 0.1), 0.26)
    b = Obj(sb, cb, 0.73, 0.5 + rng.uniform(-0.1, 0.1), 0.26)
    background = rng.choice(list(BACKGROUNDS))
    objects = (a,) if kind == "add" else (a, b)
    scene = Scene(f"a {ca} {sa}", "edit", "edit", background, objects)
    target = {"add": (cc, sc), "recolour": (cc, sb), "replace": (cc, sc if sc != sb else SHAPES[SHAPES.index(sb) - 1])}
    colour, shape = target[kind]
    return scene, f"a {ca} {sa} left of a {colour} {shape}", (colour, shape)


def edits(pipe: InfinityPipeline, schedule: ScaleSchedule, cases: int, grid: list[np.ndarray]) -> None:
    scales = schedule.vae_scales(pipe.vae.config.spatial_patchify)
    rng = random.Random(0)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:, SIZE // 2 :] = True
    rows: dict[str, list[tuple[float, float, float, bool, bool]]] = {k: [] for k in KINDS}
    for i in range(cases):
        kind = KINDS[i % len(KINDS)]
        scene, prompt, (colour, shape) = edit_case(rng, kind)
        image = render(scene, SIZE)
        out = pipe.generate(
            [prompt], schedule, SamplingParams(tau=1.0, seed=i), images=[ImageCondition(image, mask, paste=False)]
        ).images[0]
        pasted = feathered_paste(out, ImageCondition(image, mask), PASTE_FEATHER)
        kept = slice(0, SIZE // 2 - PASTE_FEATHER - 1)  # left of the feather band
        found = detect(pasted)
        follows = any(d.colour == colour and d.shape == shape and d.cx > 0.5 for d in found)
        a = scene.objects[0]
        survives = any(d.colour == a.colour and d.shape == a.shape and d.cx < 0.5 for d in found)
        trip = round_trip(pipe, image, scales)
        rows[kind].append(
            (
                psnr(out[:, kept], image[:, kept]),
                psnr(pasted[:, kept], image[:, kept]),
                psnr(trip[:, kept], image[:, kept]),
                follows,
                survives,
            )
        )
        if len(grid) < 6:
            grid.append(np.concatenate([image, _mask_picture(mask), out, pasted], axis=1))
    print(
        "| edit | cases | kept half PSNR: pure decode | pasted | VAE round trip | "
        "new object in the edited half | A kept |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        arr = np.array([x[:3] for x in r])
        finite = np.where(np.isinf(arr), 99.0, arr)
        print(
            f"| {kind} | {len(r)} | {finite[:, 0].mean():.1f} dB | {_db(finite[:, 1])} | "
            f"{finite[:, 2].mean():.1f} dB | {np.mean([x[3] for x in r]):.2f} | {np.mean([x[4] for x in r]):.2f} |"
        )


def _db(values: np.ndarray) -> str:
    return "exact (inf)" if (values >= 99).all() else f"{values.mean():.1f} dB"


def _mask_picture(mask: np.ndarray) -> np.ndarray:
    return np.repeat(np.where(mask, 255, 40).astype(np.uint8)[..., None], 3, axis=2)


def variations(pipe: InfinityPipeline, schedule: ScaleSchedule, cases: int) -> None:
    scenes = [make_scene(50_000 + i, ("single", "two", "counting")[i % 3]) for i in range(cases)]
    inputs = [render(s, SIZE) for s in scenes]
    truth = [_signature(detect(x)) for x in inputs]
    print("\n| strength | forced scales | same object count | same colours | exact round trip |")
    print("|---|---|---|---|---|")
    scales = schedule.vae_scales(pipe.vae.config.spatial_patchify)
    trips = [round_trip(pipe, x, scales) for x in inputs]
    for strength in STRENGTHS:
        outs = []
        for start in range(0, cases, 16):
            chunk = inputs[start : start + 16]
            params = [SamplingParams(tau=1.0, seed=start + j) for j in range(len(chunk))]
            conds = [ImageCondition(x, strength=strength) for x in chunk]
            outs += pipe.generate([""] * len(chunk), schedule, params, images=conds).images
        sig = [_signature(detect(o)) for o in outs]
        count = np.mean([s[0] == t[0] for s, t in zip(sig, truth, strict=True)])
        colours = np.mean([s[1] == t[1] for s, t in zip(sig, truth, strict=True)])
        exact = sum(np.array_equal(o, t) for o, t in zip(outs, trips, strict=True))
        forced = round((1 - strength) * schedule.num_scales)
        print(
            f"| {strength:.1f} | {forced} of {schedule.num_scales} | {count:.2f} | {colours:.2f} | {exact} of {cases} |"
        )


def _signature(found) -> tuple[int, tuple[str, ...]]:
    return len(found), tuple(sorted({d.colour for d in found}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=54, help="edits (a third of each kind)")
    p.add_argument("--variations", type=int, default=48, help="input scenes per strength")
    p.add_argument("--grid", type=Path, help="save input | mask | pure | pasted rows of the first edits (PNG)")
    args = p.parse_args()
    pipe, default = load_default_pipeline(RuntimeConfig())
    assert default.schedule is not None, "needs the trained default model"
    print(
        f"# Image-to-image on the default model ({time.strftime('%Y-%m-%d')}, {default.schedule.num_scales} scales)\n"
    )
    grid: list[np.ndarray] = []
    edits(pipe, default.schedule, args.cases, grid)
    variations(pipe, default.schedule, args.variations)
    if args.grid:
        picture = np.concatenate(grid, axis=0)
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.Resampling.NEAREST).save(
            args.grid
        )
        print(f"\ngrid: {args.grid} (rows: input | mask, white = edit | pure decode | pasted)")


if __name__ == "__main__":
    main()
