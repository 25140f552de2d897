import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from model.config import VAE_SIZES
from tests.conftest import make_vae
from weights import CheckpointError, load_transformer, load_vae, read_state_dict
from weights.convert import convert
from weights.official import official_transformer_state


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_files_load_unchanged(official_files, tiny_transformer, tiny_vae):
    model = load_transformer(official_files["transformer"])
    assert model.config == tiny_transformer.config
    assert same_parameters(model, tiny_transformer)
    vae = load_vae(official_files["vae"], token_bits=model.config.token_bits)
    assert vae.config == tiny_vae.config
    assert same_parameters(vae, tiny_vae)


def test_vae_keys_without_the_wrapper_level_also_load(tmp_path, tiny_vae):
    path = tmp_path / "plain.pth"
    torch.save({"vae": tiny_vae.state_dict()}, path)
    assert same_parameters(load_vae(path), tiny_vae)


def test_loader_names_every_missing_unexpected_and_misshaped_key(tmp_path, tiny_transformer):
    state = official_transformer_state(tiny_transformer)
    del state["head.bias"]
    del state["block_chunks.1.module.0.ffn.fc2.weight"]
    state["block_chunks.0.module.0.sa.mystery"] = torch.zeros(3)
    state["word_embed.bias"] = torch.zeros(65)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_transformer(path)
    message = str(err.value)
    for expected in (
        "missing (2)",
        "head.bias",
        "blocks.1.ffn.fc2.weight",
        "unexpected (1)",
        "blocks.0.sa.mystery",
        "mis-shaped (1)",
        "word_embed.bias: checkpoint [65], model [64]",
    ):
        assert expected in message, message


def test_nonzero_constant_buffer_is_refused(tmp_path, tiny_transformer):
    state = official_transformer_state(tiny_transformer)
    state["block_chunks.0.module.0.sa.zero_k_bias"] += 1
    path = tmp_path / "k_bias.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="zero_k_bias must be all zeros"):
        load_transformer(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_transformer(path)


def test_truncated_and_wrong_files_give_clear_errors(tmp_path, official_files):
    data = official_files["transformer"].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or wrong file"):
        load_transformer(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_transformer(text)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_transformer(tmp_path / "absent.pth")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_transformer(bad_st)


def test_a_vae_file_is_not_taken_for_a_transformer(tmp_path, official_files, tiny_vae):
    with pytest.raises(CheckpointError, match=r"no tensors found .*'vae'"):
        load_transformer(official_files["vae"])
    flat = tmp_path / "vae_flat.pth"
    torch.save(tiny_vae.state_dict(), flat)
    with pytest.raises(CheckpointError, match="cannot infer the architecture: no transformer blocks"):
        load_transformer(flat)


def test_sharded_folder_with_index_loads(tmp_path, tiny_transformer):
    state = official_transformer_state(tiny_transformer)
    names = sorted(state)
    half = len(names) // 2
    folder = tmp_path / "infinity_8b_weights"
    folder.mkdir()
    save_file({k: state[k].contiguous() for k in names[:half]}, str(folder / "model-00001-of-00002.safetensors"))
    torch.save({k: state[k] for k in names[half:]}, folder / "model-00002-of-00002.bin")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:half]}
    weight_map.update({k: "model-00002-of-00002.bin" for k in names[half:]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_parameters(load_transformer(folder), tiny_transformer)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_shard_names_must_stay_inside_the_folder(tmp_path, escape):
    outside = tmp_path / "outside.safetensors"  # exists: only the name check stops it
    save_file({"weight": torch.zeros(2)}, str(outside))
    folder = tmp_path / "checkpoint"
    (folder / "sub").mkdir(parents=True)
    name = str(outside) if escape == "ABSOLUTE" else escape
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"weight": name}}))
    with pytest.raises(CheckpointError, match=f"names shard '{re.escape(name)}', which is not a file inside"):
        read_state_dict(folder)


def test_convert_to_safetensors_round_trip(tmp_path, official_files, tiny_transformer, tiny_vae):
    st = convert(official_files["transformer"], tmp_path / "t.safetensors", "transformer")
    assert same_parameters(load_transformer(st), tiny_transformer)
    vst = convert(official_files["vae"], tmp_path / "v.safetensors", "vae")
    assert same_parameters(load_vae(vst), tiny_vae)


def test_vae_metadata_carries_what_shapes_cannot(tmp_path):
    from dataclasses import replace

    from weights.loader import vae_metadata

    config = replace(VAE_SIZES["tiny"], code_decay=0.6)
    vae = make_vae(config)
    official = tmp_path / "decay.pth"
    torch.save({"vae": vae.state_dict()}, official)
    assert load_vae(official).config.code_decay == 1.0  # official files: the official default
    ours = tmp_path / "decay.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(ours), metadata=vae_metadata(config))
    assert load_vae(ours).config == config


def test_patchify_is_inferred_from_the_transformer_bits(tmp_path):
    vae = make_vae(VAE_SIZES["tiny-patchify"])
    path = tmp_path / "p.pth"
    torch.save({"vae": vae.state_dict()}, path)
    assert load_vae(path, token_bits=16).config.spatial_patchify
    assert not load_vae(path, token_bits=4).config.spatial_patchify
    with pytest.raises(CheckpointError, match=r"expected 4 .* or 16"):
        load_vae(path, token_bits=8)
