"""The models file (server/models_file.py): entries parsed into ModelSpecs, every mistake named."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models_file import ModelsFileError, load_models_file, parse_models
from server.settings import Settings
from weights.default import DEFAULT_DIR


@pytest.fixture()
def files(tmp_path) -> dict[str, str]:
    for name in ("t.pth", "v.pth"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "t5").mkdir()
    return {"transformer": "t.pth", "vae": "v.pth", "text_encoder": "t5"}


def test_entries_in_order_with_their_overrides_and_paths_read_from_the_files_folder(tmp_path, files):
    (tmp_path / "models.toml").write_text(
        f"""
[[models]]
name = "default"
weights = "{DEFAULT_DIR}"

[[models]]
name = "tiny"
transformer = "t.pth"
vae = "v.pth"
text_encoder = "t5"
devices = ["cpu"]
max_batch_size = 2
batching = "continuous"
default_pn = "0.06M"
max_pn = "0.25M"
"""
    )
    first, second = load_models_file(tmp_path / "models.toml")
    assert first.name == "default" and first.weights == DEFAULT_DIR and first.weight_paths is None
    assert second.weight_paths == (tmp_path / "t.pth", tmp_path / "v.pth", tmp_path / "t5")
    assert second.overrides() == {
        "devices": ["cpu"],
        "max_batch_size": 2,
        "batching": "continuous",
        "default_pn": "0.06M",
        "max_pn": "0.25M",
    }


@pytest.mark.parametrize(
    "entry,names",
    [
        ({"name": "a", "weights": "t5", "colour": "red"}, ["entry 1 ('a')", "unknown key", "colour"]),
        ({"weights": "t5"}, ["entry 1", "`name` is required"]),
        ({"name": "a", "weights": "t5", "transformer": "t.pth"}, ["('a')", "either `weights`", "transformer"]),
        ({"name": "a", "transformer": "t.pth"}, ["('a')", "missing", "vae", "text_encoder"]),
        ({"name": "a", "transformer": "t.pth", "vae": "v.pth", "text_encoder": "gone"}, ["`text_encoder`", "gone"]),
        ({"name": "a", "weights": "t5"}, ["`weights`", "lacks the project's layout"]),
        ({"name": "a", "weights": str(DEFAULT_DIR), "dtype": "int8"}, ["`dtype` must be one of", "int8"]),
        ({"name": "a", "weights": str(DEFAULT_DIR), "max_batch_size": 0}, ["`max_batch_size`", "got 0"]),
        ({"name": "a", "weights": str(DEFAULT_DIR), "batching": "eager"}, ["`batching` must be one of", "eager"]),
        ({"name": "a", "weights": str(DEFAULT_DIR), "devices": "cpu"}, ["`devices` must be a list"]),
        ({"name": "a", "weights": str(DEFAULT_DIR), "default_pn": "1M", "max_pn": "0.25M"}, ["`default_pn` 1M"]),
    ],
)
def test_a_mistake_names_the_entry_and_the_field(tmp_path, files, entry, names):
    with pytest.raises(ModelsFileError) as err:
        parse_models({"models": [entry]}, tmp_path)
    for name in names:
        assert name in str(err.value)


def test_duplicate_names_no_entries_and_stray_keys_are_refused(tmp_path):
    entry = {"name": "a", "weights": str(DEFAULT_DIR)}
    with pytest.raises(ModelsFileError, match="entry 2: name 'a' is used twice"):
        parse_models({"models": [entry, entry]}, tmp_path)
    with pytest.raises(ModelsFileError, match="no \\[\\[models\\]\\] entries"):
        parse_models({"models": []}, tmp_path)
    with pytest.raises(ModelsFileError, match="unknown top-level"):
        parse_models({"models": [entry], "model": {}}, tmp_path)
    (tmp_path / "bad.toml").write_text("[[models]\n")
    with pytest.raises(ModelsFileError, match="not valid TOML"):
        load_models_file(tmp_path / "bad.toml")


def test_settings_refuse_a_bad_file_and_clashing_settings_naming_the_model(tmp_path):
    path = Path(tmp_path / "models.toml")
    path.write_text(f'[[models]]\nname = "small"\nweights = "{DEFAULT_DIR}"\nmax_batch_size = 2\n')
    with pytest.raises(ValueError, match="model 'small': max_n 4 exceeds max_batch_size 2"):
        Settings(models_file=path)
    assert Settings(models_file=path, max_n=2).model_specs()[0].name == "small"
    path.write_text('[[models]]\nname = "x"\n')
    with pytest.raises(ValueError, match="entry 1 \\('x'\\): give `weights`"):
        Settings(models_file=path)


def test_the_entry_download_prints_is_one_the_server_reads(tmp_path, files):
    from weights.download import ModelEntry

    entry = ModelEntry(
        "2b", tmp_path / "t.pth", tmp_path / "v.pth", tmp_path / "t5", {"FoundationVision/Infinity": "c"}
    )
    (tmp_path / "models.toml").write_text(entry.toml())
    (spec,) = load_models_file(tmp_path / "models.toml")
    assert spec.name == "2b" and spec.weight_paths == (tmp_path / "t.pth", tmp_path / "v.pth", tmp_path / "t5")
