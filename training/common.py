"""Shared pieces of the training stages: batches of rendered scenes, checkpoints, progress."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from training.shapes import NAMING_WORDS, Layout, Scene, make_scene, render

log = logging.getLogger(__name__)

# Scene seeds: training, validation and evaluation draw from disjoint ranges.
TRAIN_SEEDS, VALID_SEEDS, EVAL_SEEDS = 0, 10**9, 2 * 10**9


@contextmanager
def local_rng(seed: int) -> Iterator[None]:
    """torch's global generator seeded for this block only, and restored after it.

    Module initialisation and dropout draw from the global generator and take no generator argument,
    so a stage seeds it here, inside a fork, and leaves the caller's random state as it found it.
    Everything else in training takes an explicit `torch.Generator`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def scene_batch(first_seed: int, count: int, *, held_out: bool | None, layout: Layout) -> list[Scene]:
    return [make_scene(first_seed + i, held_out=held_out, layout=layout) for i in range(count)]


UNKNOWN_WORD = "xyzzy"  # in no caption, so the tokenizer maps it to <unk>


def with_unknown_words(captions: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Give a `rate` of the captions one unknown word: inserted anywhere, or in place of a word
    that names nothing ("a", "and", "with", ...), never in place of a colour, shape, number, size or relation."""
    out = []
    for caption, draw in zip(captions, torch.rand(len(captions), 3, generator=generator).tolist(), strict=True):
        words = caption.split()
        if draw[0] < rate:
            fillers = [i for i, w in enumerate(words) if w not in NAMING_WORDS]
            if draw[1] < 0.5 and fillers:
                words[fillers[int(draw[2] * len(fillers))]] = UNKNOWN_WORD
            else:
                words.insert(int(draw[2] * (len(words) + 1)), UNKNOWN_WORD)
        out.append(" ".join(words))
    return out


def images_tensor(scenes: list[Scene], size: int) -> torch.Tensor:
    """Scenes -> (B, 3, size, size) float32 in [-1, 1]."""
    pixels = np.stack([render(s, size) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-10))


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor * peak`. A pure function of the step, so a run can
    be extended (more steps on resume) without an optimiser-scheduler state that fixes the total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def fingerprint(module: torch.nn.Module) -> str:
    """A digest of a module's weights: caches derived from them are rebuilt when they change."""
    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken file


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


class Progress:
    """One log line every `every` seconds with rate and ETA."""

    def __init__(self, name: str, total: int, start: int = 0, every: float = 30.0) -> None:
        self.name, self.total, self.start, self.every = name, total, start, every
        self.t0 = self.last = time.monotonic()

    def update(self, step: int, **values: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every and step + 1 < self.total:
            return
        self.last = now
        rate = (step + 1 - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step - 1) / max(rate, 1e-9)
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        log.info(
            "%s step %d/%d %s (%.2f steps/s, eta %.0f min)", self.name, step + 1, self.total, shown, rate, eta / 60
        )
