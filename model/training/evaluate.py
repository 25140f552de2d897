"""GenEval-style evaluation for the shapes domain: generate from seeded prompts, score with the detector."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from model.config import SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.training.common import EVAL_SEEDS
from model.training.detector import score
from model.training.shapes import CATEGORIES, Scene, make_scene


@dataclass(frozen=True)
class EvalReport:
    accuracy: dict[str, float]      # per category, plus "single colour", "single shape" and "overall"
    count: int                      # prompts per category

    def table(self) -> str:
        rows = ["| category | accuracy |", "|---|---|"]
        rows += [f"| {k} | {v:.3f} |" for k, v in self.accuracy.items()]
        return "\n".join(rows)


def eval_scenes(per_category: int, held_out: bool) -> list[Scene]:
    """A fixed, seeded prompt set: `per_category` scenes of each category."""
    out = []
    for c, category in enumerate(CATEGORIES):
        out += [make_scene(EVAL_SEEDS + c * 100_000 + i, category, held_out=held_out) for i in range(per_category)]
    return out


def evaluate(pipe: InfinityPipeline, schedule: ScaleSchedule, per_category: int = 50, held_out: bool = False,
             cfg: float = 3.0, tau: float = 1.0, batch: int = 16) -> EvalReport:
    scenes = eval_scenes(per_category, held_out)
    verdicts: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        params = [SamplingParams(cfg=cfg, tau=tau, seed=start + i) for i in range(len(chunk))]
        result = pipe.generate([s.caption for s in chunk], schedule, params)
        for scene, image in zip(chunk, result.images):
            judged = score(scene, image)
            verdicts[scene.category].append(judged["correct"])
            if scene.category == "single":
                verdicts["single colour"].append(judged["colour"])
                verdicts["single shape"].append(judged["shape"])
    accuracy = {k: sum(v) / len(v) for k, v in verdicts.items()}
    accuracy["overall"] = sum(accuracy[c] for c in CATEGORIES) / len(CATEGORIES)
    return EvalReport(accuracy, per_category)
