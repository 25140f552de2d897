"""GenEval-style evaluation for the shapes domain: generate from seeded prompts, score with the detector.

Also the VAE's ceiling: the same prompts' own renders, encoded to bits and decoded, scored the same
way. A transformer that predicted every bit right would score exactly that, so the two tables
separate what the VAE loses from what the transformer gets wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from model.config import GuidancePreset, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.vae import BitwiseVAE, to_uint8
from training.common import EVAL_SEEDS, images_tensor
from training.detector import score
from training.shapes import CATEGORIES, Scene, make_scene


@dataclass(frozen=True)
class EvalReport:
    accuracy: dict[str, float]  # per category, plus "single colour", "single shape" and "overall"
    count: int  # prompts per category

    def table(self, ceiling: EvalReport | None = None) -> str:
        """Markdown; with `ceiling`, a second column: the VAE round trip's scores on the same prompts."""
        if ceiling is None:
            rows = ["| category | accuracy |", "|---|---|"]
            rows += [f"| {k} | {v:.3f} |" for k, v in self.accuracy.items()]
        else:
            rows = ["| category | accuracy | VAE ceiling |", "|---|---|---|"]
            rows += [
                f"| {k} | {v:.3f} | {ceiling.accuracy.get(k, float('nan')):.3f} |" for k, v in self.accuracy.items()
            ]
        return "\n".join(rows)


def eval_scenes(per_category: int, held_out: bool) -> list[Scene]:
    """A fixed, seeded prompt set: `per_category` scenes of each category."""
    out = []
    for c, category in enumerate(CATEGORIES):
        out += [make_scene(EVAL_SEEDS + c * 100_000 + i, category, held_out=held_out) for i in range(per_category)]
    return out


def evaluate(
    pipe: InfinityPipeline,
    schedule: ScaleSchedule,
    per_category: int = 50,
    held_out: bool = False,
    cfg: float = 3.0,
    tau: float = 1.0,
    batch: int = 16,
    guidance: GuidancePreset = "full",
) -> EvalReport:
    scenes = eval_scenes(per_category, held_out)
    images = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        params = [SamplingParams(cfg=cfg, tau=tau, seed=start + i, guidance=guidance) for i in range(len(chunk))]
        images += pipe.generate([s.caption for s in chunk], schedule, params).images
    return judge(scenes, images, per_category)


@torch.inference_mode()
def reconstruction_ceiling(
    vae: BitwiseVAE,
    schedule: ScaleSchedule,
    image_size: int,
    per_category: int = 50,
    held_out: bool = False,
    batch: int = 50,
) -> EvalReport:
    """Scores of the eval scenes' renders after a round trip through the VAE's bits."""
    scenes = eval_scenes(per_category, held_out)
    images: list[np.ndarray] = []
    for start in range(0, len(scenes), batch):
        pixels = images_tensor(scenes[start : start + batch], image_size)
        images += list(to_uint8(vae.reconstruct(pixels, schedule.scales)).numpy())
    return judge(scenes, images, per_category)


def judge(scenes: list[Scene], images: list[np.ndarray], per_category: int) -> EvalReport:
    verdicts: dict[str, list[bool]] = defaultdict(list)
    for scene, image in zip(scenes, images, strict=True):
        judged = score(scene, image)
        verdicts[scene.category].append(judged["correct"])
        if scene.category == "single":
            verdicts["single colour"].append(judged["colour"])
            verdicts["single shape"].append(judged["shape"])
    accuracy = {k: sum(v) / len(v) for k, v in verdicts.items()}
    accuracy["overall"] = sum(accuracy[c] for c in CATEGORIES) / len(CATEGORIES)
    return EvalReport(accuracy, per_category)
