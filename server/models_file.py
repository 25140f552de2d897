"""The models file (`serve --models models.toml`): several models in one server, one `[[models]]` each.

    [[models]]
    name = "infinity-default"
    weights = "weights/default"          # a folder in the project's own layout (weights/default.py)

    [[models]]
    name = "infinity-2b"
    transformer = "/models/infinity_2b_reg.pth"   # or the three files of an official checkpoint
    vae = "/models/infinity_vae_d32reg.pth"
    text_encoder = "/models/flan-t5-xl"
    devices = ["cuda:1"]                 # optional: the server's own setting when absent
    max_batch_size = 4

Relative paths are read from the models file's folder. Every mistake is one `ModelsFileError` naming
the entry (its name, or its position) and the field.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from model.config import ATTENTION_CHOICES, COMPILE_MODES, PRECISIONS
from model.schedules import PN_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a conditional dependency in pyproject.toml)
    import tomli as tomllib

MAX_BATCH_SIZE = 256  # as Settings.max_batch_size


class ModelsFileError(ValueError):
    """A models file that cannot be served; the message names the entry and the field."""


@dataclass(frozen=True)
class ModelSpec:
    """One `[[models]]` entry. None: the server's own setting (or the model's own default)."""

    name: str  # the id clients send as `model`
    weights: Path | None = None  # a folder in the project's layout; else the three files below
    transformer: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    devices: tuple[str, ...] | None = None  # one replica per device
    dtype: str | None = None
    attention: str | None = None
    compile: str | None = None
    max_batch_size: int | None = None
    batching: str | None = None  # "static" or "continuous"
    default_pn: str | None = None
    max_pn: str | None = None

    @property
    def weight_paths(self) -> tuple[Path, Path, Path] | None:
        """(transformer, vae, text_encoder); None for a `weights` folder."""
        if self.transformer is None or self.vae is None or self.text_encoder is None:
            return None
        return self.transformer, self.vae, self.text_encoder

    def overrides(self) -> dict[str, Any]:
        """The server settings this entry sets for its own model (Settings field -> value)."""
        names = ("dtype", "attention", "compile", "max_batch_size", "batching", "default_pn", "max_pn")
        given: dict[str, Any] = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.devices is not None:
            given["devices"] = list(self.devices)
        return given


KNOWN_KEYS = tuple(f.name for f in fields(ModelSpec))
_PATHS = ("transformer", "vae", "text_encoder")
_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": PRECISIONS,
    "attention": ATTENTION_CHOICES,
    "compile": COMPILE_MODES,
    "batching": ("static", "continuous"),  # Settings.batching's
    "default_pn": PN_NAMES,
    "max_pn": PN_NAMES,
}


def load_models_file(path: str | Path) -> tuple[ModelSpec, ...]:
    """The entries of a models file, checked; the first is the model of requests that name none."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ModelsFileError(f"models file {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ModelsFileError(f"models file {path}: not valid TOML: {e}") from None
    return parse_models(data, path.parent, str(path))


def parse_models(data: Mapping[str, Any], root: Path, source: str = "models file") -> tuple[ModelSpec, ...]:
    """`data`: the parsed TOML; relative paths are read from `root`."""
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ModelsFileError(f"{source}: unknown top-level key(s) {unknown}; only [[models]] entries belong here")
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ModelsFileError(f"{source}: no [[models]] entries")
    specs: list[ModelSpec] = []
    for position, entry in enumerate(entries, start=1):
        spec = _entry(entry, root, f"{source}: [[models]] entry {position}")
        if any(s.name == spec.name for s in specs):
            raise ModelsFileError(f"{source}: [[models]] entry {position}: name {spec.name!r} is used twice")
        specs.append(spec)
    return tuple(specs)


def _entry(entry: Any, root: Path, where: str) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ModelsFileError(f"{where}: expected a table, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ModelsFileError(f"{where}: `name` is required (a non-empty string), got {name!r}")
    where = f"{where} ({name!r})"
    unknown = sorted(set(entry) - set(KNOWN_KEYS))
    if unknown:
        raise ModelsFileError(f"{where}: unknown key(s) {unknown}; known: {list(KNOWN_KEYS)}")
    values: dict[str, Any] = {"name": name}
    for key in ("weights", *_PATHS):
        if key in entry:
            if not isinstance(entry[key], str) or not entry[key]:
                raise ModelsFileError(f"{where}: `{key}` must be a path (a string), got {entry[key]!r}")
            values[key] = root / Path(entry[key]).expanduser()
            if not values[key].exists():
                raise ModelsFileError(f"{where}: `{key}`: {values[key]} does not exist")
    given = [k for k in _PATHS if k in values]
    if "weights" in values and given:
        raise ModelsFileError(f"{where}: give either `weights` or {list(_PATHS)}, not both (got {given})")
    if "weights" not in values and len(given) != len(_PATHS):
        missing = [k for k in _PATHS if k not in values]
        raise ModelsFileError(f"{where}: give `weights`, or all of {list(_PATHS)} (missing: {missing})")
    if "weights" in values:
        from weights.default import default_files_present  # lazily: torch, for the settings' import

        if not default_files_present(values["weights"]):
            raise ModelsFileError(
                f"{where}: `weights`: {values['weights']} lacks the project's layout "
                f"(transformer.safetensors, vae.safetensors, text_encoder/, schedule.json)"
            )
    for key, choices in _CHOICES.items():
        if key in entry:
            if entry[key] not in choices:
                raise ModelsFileError(f"{where}: `{key}` must be one of {list(choices)}, got {entry[key]!r}")
            values[key] = entry[key]
    if "max_batch_size" in entry:
        size = entry["max_batch_size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_BATCH_SIZE:
            raise ModelsFileError(f"{where}: `max_batch_size` must be between 1 and {MAX_BATCH_SIZE}, got {size!r}")
        values["max_batch_size"] = size
    if "devices" in entry:
        devices = entry["devices"]
        if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
            raise ModelsFileError(f'{where}: `devices` must be a list of device names such as ["cuda:0"]')
        values["devices"] = tuple(devices)
    default_pn, max_pn = values.get("default_pn"), values.get("max_pn")
    if default_pn and max_pn and PN_NAMES.index(default_pn) > PN_NAMES.index(max_pn):
        raise ModelsFileError(f"{where}: `default_pn` {default_pn} exceeds `max_pn` {max_pn}")
    return ModelSpec(**values)
