"""Stage 1c: pre-train the small T5 to parse a caption into its scene, before the transformer.

Why: the official model's Flan-T5 arrives knowing word order; ours starts random. Trained only
jointly with the transformer, its features never learned which noun phrase comes first: a probe on
the v5 encoder found the first-named object's colour 51% of the time (chance between the two named
colours), and the transformer drew a pair's colours on either side at random. Neither side can learn
to use word order before the other offers it, so the text side is taught first, on text alone.

The task: from the T5 features, a small head with one learned query per object slot reads off each
object's colour and shape in reading order (left to right, or top to bottom for a column), plus the
arrangement (one, row, column, grid). The targets come from the scene's own objects, so position
captions ("a red star to the right of a blue circle") teach that the blue circle comes first. The
head is a training aid only: it is not exported, and the shipped encoder is a plain T5EncoderModel.
The same loss, down-weighted, keeps the encoder from forgetting while it trains with the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerFast, T5EncoderModel

from training.common import (
    TRAIN_SEEDS,
    Progress,
    load_checkpoint,
    local_rng,
    save_checkpoint,
    scene_batch,
    warmup_cosine,
    with_unknown_words,
)
from training.recipe import GroundingTraining
from training.shapes import COLOURS, SHAPES, Layout, Scene

SLOTS = 4
ARRANGEMENTS = ("one", "row", "column", "grid")
NONE_COLOUR, NONE_SHAPE = len(COLOURS), len(SHAPES)  # the class of an empty slot


@dataclass(frozen=True)
class SceneTargets:
    colours: torch.Tensor  # (B, SLOTS) long; NONE_COLOUR where the slot is empty
    shapes: torch.Tensor  # (B, SLOTS) long; NONE_SHAPE where empty
    arrangement: torch.Tensor  # (B,) long, an index into ARRANGEMENTS

    def __getitem__(self, index) -> SceneTargets:
        return SceneTargets(self.colours[index], self.shapes[index], self.arrangement[index])


def _arrangement(scene: Scene) -> str:
    objects = scene.objects
    if len(objects) == 1:
        return "one"
    if len(objects) == 4:
        return "grid"
    xs, ys = [o.cx for o in objects], [o.cy for o in objects]
    return "row" if max(xs) - min(xs) >= max(ys) - min(ys) else "column"


def scene_targets(scenes: list[Scene]) -> SceneTargets:
    colour_names, shape_names = list(COLOURS), list(SHAPES)
    colours = torch.full((len(scenes), SLOTS), NONE_COLOUR)
    shapes = torch.full((len(scenes), SLOTS), NONE_SHAPE)
    arrangement = torch.zeros(len(scenes), dtype=torch.long)
    for i, scene in enumerate(scenes):
        kind = _arrangement(scene)
        key = {"row": lambda o: o.cx, "column": lambda o: o.cy}.get(kind, lambda o: (o.cy, o.cx))
        for j, obj in enumerate(sorted(scene.objects, key=key)):  # a grid's four objects are alike
            colours[i, j], shapes[i, j] = colour_names.index(obj.colour), shape_names.index(obj.shape)
        arrangement[i] = ARRANGEMENTS.index(kind)
    return SceneTargets(colours, shapes, arrangement)


class GroundingHead(nn.Module):
    """One learned query per slot, cross-attending to the caption's T5 features."""

    def __init__(self, text_channels: int, heads: int = 4) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(SLOTS + 1, text_channels) * 0.02)  # + 1: the arrangement
        self.attend = nn.MultiheadAttention(text_channels, heads, batch_first=True)
        self.norm = nn.LayerNorm(text_channels)
        self.colour = nn.Linear(text_channels, NONE_COLOUR + 1)
        self.shape = nn.Linear(text_channels, NONE_SHAPE + 1)
        self.arrangement = nn.Linear(text_channels, len(ARRANGEMENTS))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        queries = self.queries.unsqueeze(0).expand(len(features), -1, -1)
        read, _ = self.attend(queries, features, features, key_padding_mask=~mask.bool(), need_weights=False)
        read = self.norm(read)
        slots = read[:, :SLOTS]
        return self.colour(slots), self.shape(slots), self.arrangement(read[:, SLOTS])


def grounding_loss(
    head: GroundingHead, features: torch.Tensor, mask: torch.Tensor, targets: SceneTargets
) -> torch.Tensor:
    colour, shape, arrangement = head(features.float(), mask)
    return (
        F.cross_entropy(colour.flatten(0, 1), targets.colours.flatten())
        + F.cross_entropy(shape.flatten(0, 1), targets.shapes.flatten())
        + F.cross_entropy(arrangement, targets.arrangement)
    )


def t5_features(
    t5: T5EncoderModel, tokenizer: PreTrainedTokenizerFast, captions: list[str], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(captions, max_length=max_len, padding="longest", truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"]
    return t5(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state, mask


def pretrain_text_encoder(
    t5: T5EncoderModel,
    tokenizer: PreTrainedTokenizerFast,
    settings: GroundingTraining,
    max_len: int,
    layout: Layout,
    seed: int,
    workdir: Path,
) -> GroundingHead:
    """Trains `t5` in place and returns the head; skipped (state reloaded) when already done."""
    with local_rng(seed + 3):  # the head's initialisation and T5's dropout
        return _pretrain_text_encoder(t5, tokenizer, settings, max_len, layout, seed, workdir)


def _pretrain_text_encoder(
    t5: T5EncoderModel,
    tokenizer: PreTrainedTokenizerFast,
    settings: GroundingTraining,
    max_len: int,
    layout: Layout,
    seed: int,
    workdir: Path,
) -> GroundingHead:
    path = workdir / "grounding.ckpt"
    head = GroundingHead(t5.config.d_model)
    if (state := load_checkpoint(path)) is not None and state["step"] >= settings.steps:
        t5.load_state_dict(state["t5"]), head.load_state_dict(state["head"])
        return head
    scenes = scene_batch(TRAIN_SEEDS + 2 * 10**8, settings.scenes, held_out=False, layout=layout)
    captions, targets = [s.caption for s in scenes], scene_targets(scenes)
    params = list(t5.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 4)
    progress = Progress("text encoder", settings.steps)
    t5.train(), head.train()
    for step in range(settings.steps):
        index = torch.randint(len(captions), (settings.batch,), generator=generator)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, settings.steps, settings.lr, warmup=100)
        batch = with_unknown_words([captions[i] for i in index], settings.unknown_words, generator)
        features, mask = t5_features(t5, tokenizer, batch, max_len)
        loss = grounding_loss(head, features, mask, targets[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss=loss.item())
    save_checkpoint(path, t5=t5.state_dict(), head=head.state_dict(), step=settings.steps)
    return head
