"""`infinity-serve download`: the official weights from their hub repositories, checked, optionally converted.

Where the files live (read from the official repository github.com/FoundationVision/Infinity, 2026-12):
- README.md, "Infinity Model ZOO": the weights repository is `FoundationVision/Infinity` on the Hugging
  Face hub, holding `infinity_2b_reg.pth`, `infinity_vae_d32reg.pth` (the README's link text says
  `infinity_vae_d32_reg.pth`, the file is `d32reg`), the sharded folders `infinity_8b_weights/` and
  `infinity_8b_512x512_weights/` ("middle stage model of Infinity-8B generating 512x512 images").
  "Installation", step 3: the text encoder is `google/flan-t5-xl`.
- scripts/infer.sh: the 2B run reads weights/infinity_2b_reg.pth, weights/infinity_vae_d32reg.pth and
  weights/flan-t5-xl (the layout written here).
- tools/interactive_infer_8b.ipynb and the 8B 512x512 notebook (as summarised in our fact sheet
  infinity-transformer-facts.md, section 1.3): both 8B folders load with `torch_shard` and the VAE
  `infinity_vae_d56_f8_14_patchify.pth` (14 bits, 2x2 patchify: 56 bits per transformer token).
Revisions: google/flan-t5-xl is pinned to 7d6315df2c2fb742f0f5b556879d730926ca9001, the snapshot that
official-Infinity users' scripts name next to infinity_2b_reg.pth. We know of no commit of
FoundationVision/Infinity that is sure to hold all three models' files (the 8B 512x512 folder came in
June 2025), so it follows `main`: every run resolves it to one commit first, downloads every file at
that commit and names it in the printed entry, to pin with `--revision`.

Every file is checked after download against the hub's listing: size, and the sha256 of LFS files (the
weights) or the git blob hash of the small ones. A file that does not match is fetched again once.
A dropped connection resumes where it stopped (huggingface_hub retries with a Range request); a run that
is stopped keeps every complete file and fetches only the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import httpx as hub_http  # the HTTP client huggingface_hub uses (httpx2 in 2.x)

from weights.convert import convert

log = logging.getLogger(__name__)
_CHUNK = 8 * 2**20


class DownloadError(OSError):
    """A repository lacks a file we need, or a file still fails its check after a second download."""


@dataclass(frozen=True)
class HubRepo:
    """A hub repository at a revision, and the files we need of it (fnmatch patterns, each must match)."""

    repo_id: str
    revision: str  # a branch, tag or commit; resolved to one commit before anything is fetched
    patterns: tuple[str, ...]


FLAN_T5_XL = HubRepo(
    "google/flan-t5-xl",
    "7d6315df2c2fb742f0f5b556879d730926ca9001",
    # the encoder's config and weights (the decoder's come along: one set of shards holds both) and
    # the tokenizer; not the TF, Flax or duplicate PyTorch .bin weights
    (
        "config.json",
        "model*.safetensors",
        "model.safetensors.index.json",
        "spiece.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ),
)
INFINITY_REPO = "FoundationVision/Infinity"


@dataclass(frozen=True)
class OfficialModel:
    """One official model: where its transformer and VAE are in INFINITY_REPO, and its text encoder."""

    name: str
    transformer: str  # a file, or a folder of shards (sharded=True), in the repository
    vae: str
    # bits per transformer token, for the VAE conversion: 56 = 8B's 2x2 patchify; None = the VAE's own bits
    token_bits: int | None = None
    sharded: bool = False
    revision: str = "main"
    text_encoder: HubRepo = FLAN_T5_XL
    text_encoder_dir: str = "flan-t5-xl"  # under the download folder, as the official scripts have it

    def weights_repo(self, revision: str | None = None) -> HubRepo:
        transformer = f"{self.transformer}/*" if self.sharded else self.transformer
        return HubRepo(INFINITY_REPO, revision or self.revision, (transformer, self.vae))


OFFICIAL_MODELS = {
    m.name: m
    for m in (
        OfficialModel("2b", "infinity_2b_reg.pth", "infinity_vae_d32reg.pth"),
        OfficialModel("8b", "infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth", token_bits=56, sharded=True),
        OfficialModel(
            "8b-512", "infinity_8b_512x512_weights", "infinity_vae_d56_f8_14_patchify.pth", token_bits=56, sharded=True
        ),
    )
}


def official_model(name: str) -> OfficialModel:
    """The official model of that exact name; an unknown name lists the valid ones."""
    if name not in OFFICIAL_MODELS:
        raise ValueError(f"unknown model {name!r}; the official ones are: {', '.join(OFFICIAL_MODELS)}")
    return OFFICIAL_MODELS[name]


@dataclass(frozen=True)
class ModelEntry:
    """What `download` leaves on disk, as the models file names it."""

    name: str
    transformer: Path
    vae: Path
    text_encoder: Path
    commits: dict[str, str]  # repo id -> the commit every file came from

    def toml(self) -> str:
        """A `[[models]]` entry (JSON strings are valid TOML basic strings)."""
        pins = ", ".join(f"{repo}@{commit}" for repo, commit in self.commits.items())
        fields = {
            "name": self.name,
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
        }
        lines = [f"# {pins}", "[[models]]", *(f"{k} = {json.dumps(str(v))}" for k, v in fields.items())]
        return "\n".join(lines) + "\n"


def download(
    model: OfficialModel,
    dest: str | Path,
    revision: str | None = None,
    convert_weights: bool = False,
    endpoint: str | None = None,
) -> ModelEntry:
    """Fetch (or complete, or repair) one official model under `dest`; optionally convert it to safetensors.

    endpoint: the hub's address (None: huggingface_hub's own, HF_ENDPOINT or huggingface.co).
    """
    dest = Path(dest)
    api = HfApi(endpoint=endpoint)
    weights_commit = fetch(api, model.weights_repo(revision), dest)
    text_dir = dest / model.text_encoder_dir
    text_commit = fetch(api, model.text_encoder, text_dir)
    transformer, vae = dest / model.transformer, dest / model.vae
    if convert_weights:
        transformer = _convert_once(transformer, "transformer")
        vae = _convert_once(vae, "vae", model.token_bits)
    commits = {INFINITY_REPO: weights_commit, model.text_encoder.repo_id: text_commit}
    return ModelEntry(model.name, transformer, vae, text_dir, commits)


def fetch(api: HfApi, repo: HubRepo, local_dir: Path) -> str:
    """Download the files of `repo` that its patterns name into `local_dir`, each checked; returns the commit."""
    try:
        commit = api.repo_info(repo.repo_id, revision=repo.revision).sha
        assert commit is not None, "the hub names the commit of every revision"
        listing = api.list_repo_tree(repo.repo_id, revision=commit, recursive=True)
        files = select(repo, [f for f in listing if isinstance(f, RepoFile)])
        log.info("%s@%s (%s): %d files into %s", repo.repo_id, repo.revision, commit, len(files), local_dir)
        for entry in files:
            _fetch_file(api, repo.repo_id, commit, entry, local_dir)
    except hub_http.TransportError as e:  # no route, refused, timed out (after huggingface_hub's retries)
        raise DownloadError(f"{repo.repo_id}: cannot reach {api.endpoint}: {e}") from e
    return commit


def select(repo: HubRepo, files: Iterable[RepoFile]) -> list[RepoFile]:
    """The files any pattern matches; raises naming every pattern that matches nothing."""
    files = list(files)
    unmatched = [p for p in repo.patterns if not any(fnmatchcase(f.path, p) for f in files)]
    if unmatched:
        raise DownloadError(f"{repo.repo_id}@{repo.revision} holds no file matching {', '.join(unmatched)}")
    return [f for f in files if any(fnmatchcase(f.path, p) for p in repo.patterns)]


def _fetch_file(api: HfApi, repo_id: str, commit: str, entry: RepoFile, local_dir: Path) -> None:
    """Download (a complete, checked file is kept as it is), check, and download again once if it fails."""
    for force in (False, True):
        path = hf_hub_download(
            repo_id,
            entry.path,
            revision=commit,
            local_dir=local_dir,
            force_download=force,
            endpoint=api.endpoint,
        )
        problem = check_file(Path(path), entry)
        if problem is None:
            return
        log.warning("%s: %s%s", path, problem, "" if force else "; downloading it again")
    raise DownloadError(f"{local_dir / entry.path}: {problem} after downloading it twice")


def check_file(path: Path, entry: RepoFile) -> str | None:
    """What is wrong with a local copy of a hub file (size, then content hash), or None."""
    size = path.stat().st_size
    if size != entry.size:
        return f"{size} bytes, the hub has {entry.size}"
    if entry.lfs is not None:  # weights: the hub lists the sha256 of the content
        digest, expected = _hash(path, hashlib.sha256()), entry.lfs.sha256
    else:  # small files: the git blob id, sha1 over a "blob <size>\0" header and the content
        digest, expected = _hash(path, hashlib.sha1(f"blob {size}\0".encode())), entry.blob_id
    return None if digest == expected else f"content hash {digest}, the hub has {expected}"


def _hash(path: Path, h: hashlib._Hash) -> str:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _convert_once(src: Path, kind: Literal["transformer", "vae"], token_bits: int | None = None) -> Path:
    """`x.pth` (or a shard folder `x`) -> `x.safetensors` beside it, unless that is newer than every file
    of the source (a file fetched again is converted again)."""
    dst = src.with_name(f"{src.stem}.safetensors")
    sources = [p for p in src.rglob("*") if p.is_file()] if src.is_dir() else [src]
    if dst.exists() and dst.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        log.info("%s is already converted: %s", src, dst)
        return dst
    log.info("converting %s -> %s", src, dst)
    return convert(src, dst, kind, token_bits)
