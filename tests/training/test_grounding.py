"""Stage 1c: the text encoder learns to parse captions into their scenes, word order included."""

import torch
from transformers import AutoTokenizer, T5EncoderModel

from model.t5_builder import build_t5_encoder_dir
from training.common import EVAL_SEEDS, UNKNOWN_WORD, scene_batch, with_unknown_words
from training.grounding import (
    ARRANGEMENTS,
    NONE_COLOUR,
    NONE_SHAPE,
    GroundingHead,
    pretrain_text_encoder,
    scene_targets,
    t5_features,
)
from training.recipe import GroundingTraining
from training.shapes import COLOURS, SHAPES, Obj, Scene, make_scene, vocabulary


def _scene(*objects: Obj) -> Scene:
    return Scene("", "position", "", "black", objects)


def test_targets_list_objects_in_reading_order():
    red_right = _scene(Obj("star", "red", 0.75, 0.5, 0.2), Obj("circle", "blue", 0.25, 0.52, 0.2))
    red_below = _scene(Obj("star", "red", 0.5, 0.8, 0.2), Obj("circle", "blue", 0.45, 0.2, 0.2))
    lone = _scene(Obj("square", "lime", 0.5, 0.5, 0.3))
    t = scene_targets([red_right, red_below, lone])
    blue, red, lime = (list(COLOURS).index(c) for c in ("blue", "red", "lime"))
    assert t.colours.tolist() == [
        [blue, red, NONE_COLOUR, NONE_COLOUR],
        [blue, red, NONE_COLOUR, NONE_COLOUR],
        [lime, NONE_COLOUR, NONE_COLOUR, NONE_COLOUR],
    ]
    assert t.shapes[2].tolist() == [SHAPES.index("square")] + [NONE_SHAPE] * 3
    assert [ARRANGEMENTS[i] for i in t.arrangement] == ["row", "column", "one"]


def test_targets_follow_the_caption_of_generated_scenes():
    for seed in range(40):
        scene = make_scene(seed, "attribution")
        first = scene_targets([scene]).colours[0, 0].item()
        assert list(COLOURS)[first] == scene.caption.split()[1] or scene.caption.startswith(
            "a " + scene.objects[0].shape
        )
        assert list(COLOURS)[first] == scene.objects[0].colour  # the first named is on the left


def test_unknown_words_never_replace_what_the_caption_names():
    captions = [make_scene(i).caption for i in range(200)]
    assert with_unknown_words(captions, 0.0, torch.Generator().manual_seed(0)) == captions
    changed = with_unknown_words(captions, 1.0, torch.Generator().manual_seed(0))
    naming = (
        set(COLOURS)
        | set(SHAPES)
        | {s + "s" for s in SHAPES}
        | {"two", "three", "four", "left", "right", "above", "below", "small", "medium", "big"}
    )
    for before, after in zip(captions, changed, strict=True):
        assert after.split().count(UNKNOWN_WORD) == 1
        assert [w for w in before.split() if w in naming] == [w for w in after.split() if w in naming]
    assert UNKNOWN_WORD not in vocabulary()


def _first_colour_accuracy(t5, tokenizer, head) -> float:
    scenes = [s for s in scene_batch(EVAL_SEEDS, 300, held_out=True, layout="composed") if len(s.objects) == 2]
    with torch.no_grad():
        features, mask = t5_features(t5.eval(), tokenizer, [s.caption for s in scenes], 24)
        colour = head.eval()(features, mask)[0].argmax(-1)
    return (colour[:, :2] == scene_targets(scenes).colours[:, :2]).all(-1).float().mean().item()


def test_pretraining_teaches_word_order_that_carries_to_held_out_wording(tmp_path):
    """A tiny T5 learns which named object comes first, on held-out templates whose new words it has
    never seen (they reach it as <unk>); untrained, it cannot tell. A rerun reloads, without training."""
    build_t5_encoder_dir(tmp_path / "t5", vocabulary(), d_model=64, num_layers=2, num_heads=4, d_ff=128, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t5")
    t5 = T5EncoderModel.from_pretrained(tmp_path / "t5")
    settings = GroundingTraining(steps=800, batch=64, scenes=4000, lr=3e-3)
    assert _first_colour_accuracy(t5, tokenizer, GroundingHead(64)) < 0.1
    head = pretrain_text_encoder(t5, tokenizer, settings, 24, "composed", seed=0, workdir=tmp_path)
    assert _first_colour_accuracy(t5, tokenizer, head) > 0.9
    reloaded_t5 = T5EncoderModel.from_pretrained(tmp_path / "t5")
    reloaded = pretrain_text_encoder(reloaded_t5, tokenizer, settings, 24, "composed", seed=0, workdir=tmp_path)
    assert _first_colour_accuracy(reloaded_t5, tokenizer, reloaded) > 0.9
