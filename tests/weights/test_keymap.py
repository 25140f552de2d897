"""Every official name of the 2B/8B/VAE listings maps onto our modules with the same shape."""

import csv
import re

import pytest
import torch

from model.config import TRANSFORMER_SIZES, VAE_SIZES
from model.transformer import Infinity
from model.vae import BitwiseVAE
from tests.conftest import DATA
from weights.infer import infer_transformer_config, infer_vae_config
from weights.keymap import official_transformer_name
from weights.loader import check_keys, map_transformer_state, map_vae_state, shapes_of


def read_listing(name: str) -> dict[str, tuple[int, ...]]:
    with open(DATA / name) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["name"]: tuple(int(v) for v in re.findall(r"\d+", r["shape"])) for r in rows}


def meta_tensors(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize(
    "size,listing,entries", [("2b", "infinity-2b-state-dict.tsv", 694), ("8b", "infinity-8b-state-dict.tsv", 862)]
)
def test_official_transformer_listing_maps_onto_the_model(size, listing, entries):
    official = read_listing(listing)
    assert len(official) == entries
    config = infer_transformer_config(official)
    assert config == TRANSFORMER_SIZES[size]
    with torch.device("meta"):
        model = Infinity(config)
    mapped = map_transformer_state(meta_tensors(official), config.blocks_per_chunk)
    check_keys(shapes_of(model.state_dict()), shapes_of(mapped), listing)  # raises on any difference
    # and back: our names -> the official names
    back = {official_transformer_name(k, config.blocks_per_chunk) for k in model.state_dict()}
    assert back == {k for k in official if not k.endswith("zero_k_bias")}


@pytest.mark.parametrize(
    "listing,size,token_bits",
    [
        ("infinity-vae-d32-state-dict.tsv", "d32", 32),
        ("infinity-vae-d64-state-dict.tsv", "d64", 64),
        ("infinity-vae-d56-f8-14-patchify-state-dict.tsv", "d14-patchify", 56),
    ],
)
def test_official_vae_listing_maps_onto_the_model(listing, size, token_bits):
    official = read_listing(listing)
    config = infer_vae_config(official, token_bits=token_bits)
    assert config == VAE_SIZES[size]
    with torch.device("meta"):
        vae = BitwiseVAE(config)
    ours = vae.state_dict()
    mapped = map_vae_state(meta_tensors(official), set(ours))
    check_keys(shapes_of(ours), shapes_of(mapped), listing)


def test_named_layer_sizes_round_trip_through_inference():
    for name in ("layer12", "layer16", "layer24", "layer32", "layer40", "layer48"):
        config = TRANSFORMER_SIZES[name]
        with torch.device("meta"):
            model = Infinity(config)
        official = {
            official_transformer_name(k, config.blocks_per_chunk): tuple(v.shape) for k, v in model.state_dict().items()
        }
        assert infer_transformer_config(official) == config
