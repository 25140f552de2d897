"""`infinity-serve download` against a tiny hub served from this process on 127.0.0.1.

The fake hub answers the requests huggingface_hub makes (huggingface_hub/hf_api.py `repo_info`,
`list_repo_tree`; file_download.py `get_hf_file_metadata` (HEAD) and `http_get` (GET, Range)) and serves
the tiny official-format checkpoints of tests/conftest.py under the official names. Nothing leaves the
machine: HF_HUB_OFFLINE stays set for the rest of the suite, and is lifted only inside these tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from weights import load_transformer, load_vae
from weights.download import (
    FLAN_T5_XL,
    INFINITY_REPO,
    OFFICIAL_MODELS,
    DownloadError,
    HubRepo,
    OfficialModel,
    download,
    official_model,
)
from weights.official import official_transformer_state

COMMIT = "a" * 40  # FoundationVision/Infinity's "main" here
OLD_COMMIT = "b" * 40  # an older commit, without the 8B folders
LFS_SUFFIXES = (".pth", ".safetensors", ".bin", ".h5")


@dataclass
class Request:
    method: str
    repo_file: str  # "<repo id>/<path>" for file requests, the URL path for API calls
    range: str | None


@dataclass
class FakeHub:
    """Repos: repo id -> commit -> path -> content. Commits named by a branch are in `branches`."""

    repos: dict[str, dict[str, dict[str, bytes]]]
    branches: dict[str, str] = field(default_factory=dict)  # "<repo id>@main" -> commit
    drop_once: set[str] = field(default_factory=set)  # files whose first GET stops half-way
    serve_corrupted: set[str] = field(default_factory=set)  # files served with a flipped byte
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    def gets(self, repo_file: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.repo_file == repo_file]

    def fetched(self) -> set[str]:
        return {r.repo_file for r in self.requests if r.method == "GET" and not r.repo_file.startswith("api/")}

    def commit_of(self, repo_id: str, revision: str) -> str | None:
        commit = self.branches.get(f"{repo_id}@{revision}", revision)
        return commit if commit in self.repos.get(repo_id, {}) else None


def tree_entry(path: str, content: bytes) -> dict:
    blob = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    entry = {"type": "file", "path": path, "size": len(content), "oid": blob}
    if path.endswith(LFS_SUFFIXES):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self.route(head=True)

        def do_GET(self) -> None:
            self.route(head=False)

        def route(self, head: bool) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"]:
                hub.requests.append(Request(self.command, "/".join(parts), None))
                self.api(f"{parts[2]}/{parts[3]}", parts[4], parts[5])
            elif len(parts) > 4 and parts[2] == "resolve":
                repo_id, path = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                hub.requests.append(Request(self.command, f"{repo_id}/{path}", self.headers.get("Range")))
                self.resolve(repo_id, parts[3], path, head)
            else:
                self.reply(404, b"{}")

        def api(self, repo_id: str, kind: str, revision: str) -> None:
            commit = hub.commit_of(repo_id, revision)
            if commit is None:
                self.reply(404, b'{"error": "no such revision"}', {"X-Error-Code": "RevisionNotFound"})
            elif kind == "revision":
                self.reply(200, json.dumps({"id": repo_id, "sha": commit}).encode())
            else:  # tree, recursive
                files = hub.repos[repo_id][commit]
                folders = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
                listing = [{"type": "directory", "path": d, "oid": "0" * 40} for d in folders]
                listing += [tree_entry(p, c) for p, c in sorted(files.items())]
                self.reply(200, json.dumps(listing).encode())

        def resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            commit = hub.commit_of(repo_id, revision)
            content = hub.repos[repo_id][commit].get(path) if commit else None
            if content is None:
                self.reply(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head=head)
                return
            entry = tree_entry(path, content)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
            if "lfs" in entry:
                headers |= {"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(content))}
            key = f"{repo_id}/{path}"
            if key in hub.serve_corrupted:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers["Range"] else 0
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            if not head and key in hub.drop_once:
                hub.drop_once.discard(key)
                self.reply(200, content[: len(content) // 2], headers, length=len(content))
                self.close_connection = True  # the rest never comes: the client sees the connection drop
                return
            self.reply(206 if start else 200, content[start:], headers, head=head)

        def reply(self, status: int, body: bytes, headers: dict | None = None, head=False, length=None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if not head:
                self.wfile.write(body)
                self.wfile.flush()

    return Handler


@pytest.fixture
def serve_hub():
    servers = []

    def start(hub: FakeHub) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        hub.url = f"http://127.0.0.1:{server.server_address[1]}"
        return hub

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub read HF_HUB_OFFLINE=1 at import (tests/conftest.py): lift it for this test only,
    and keep its cache away from the user's."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def infinity_files(official_files, tiny_transformer) -> dict[str, bytes]:
    """FoundationVision/Infinity at COMMIT: the tiny models under the official names, and files we never need."""
    transformer, vae = official_files["transformer"].read_bytes(), official_files["vae"].read_bytes()
    return {
        "README.md": b"# Infinity\n",
        "infinity_2b_reg.pth": transformer,
        "infinity_vae_d32reg.pth": vae,
        "infinity_vae_d16.pth": vae[::-1],
        "infinity_vae_d56_f8_14_patchify.pth": vae,
        **sharded("infinity_8b_weights", official_transformer_state(tiny_transformer)),
        **sharded("infinity_8b_512x512_weights", official_transformer_state(tiny_transformer)),
    }


def sharded(folder: str, state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """A folder as transformers' sharded checkpoints are laid out: two .bin shards and an index."""
    names = sorted(state)
    halves = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    files: dict[str, bytes] = {}
    for shard, keys in halves.items():
        buf = io.BytesIO()
        torch.save({k: state[k] for k in keys}, buf)
        files[f"{folder}/{shard}"] = buf.getvalue()
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    files[f"{folder}/pytorch_model.bin.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return files


@pytest.fixture(scope="module")
def t5_files(t5_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in t5_dir.iterdir() if p.is_file()}


TINY_T5 = HubRepo("google/flan-t5-xl", FLAN_T5_XL.revision, ("config.json", "model*.safetensors", "tokenizer*.json"))


def tiny(name: str) -> OfficialModel:
    """An official model with the tiny T5's files (it has no index, no spiece.model)."""
    return replace(OFFICIAL_MODELS[name], text_encoder=TINY_T5)


@pytest.fixture
def hub(serve_hub, infinity_files, t5_files, online) -> FakeHub:
    t5 = {**t5_files, "tf_model.h5": b"tf" * 100, "flax_model.msgpack": b"flax"}
    old = {k: v for k, v in infinity_files.items() if not k.startswith("infinity_8b")}
    return serve_hub(
        FakeHub(
            {INFINITY_REPO: {COMMIT: infinity_files, OLD_COMMIT: old}, FLAN_T5_XL.repo_id: {FLAN_T5_XL.revision: t5}},
            branches={f"{INFINITY_REPO}@main": COMMIT},
        )
    )


def test_2b_fetches_only_its_files_converts_them_and_they_load(hub, tmp_path, official_files, t5_dir):
    old_umask = os.umask(0o022)
    try:
        entry = download(tiny("2b"), tmp_path / "weights", convert_weights=True, endpoint=hub.url)
    finally:
        os.umask(old_umask)
    t5 = FLAN_T5_XL.repo_id
    assert hub.fetched() == {
        f"{INFINITY_REPO}/infinity_2b_reg.pth",
        f"{INFINITY_REPO}/infinity_vae_d32reg.pth",
        *(f"{t5}/{name}" for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")),
    }
    weights = tmp_path / "weights"
    assert (weights / "infinity_2b_reg.pth").read_bytes() == official_files["transformer"].read_bytes()
    assert (weights / "flan-t5-xl" / "model.safetensors").read_bytes() == (t5_dir / "model.safetensors").read_bytes()
    assert entry.transformer == weights / "infinity_2b_reg.safetensors"
    assert entry.vae == weights / "infinity_vae_d32reg.safetensors"
    assert entry.text_encoder == weights / "flan-t5-xl"
    assert entry.commits == {INFINITY_REPO: COMMIT, t5: FLAN_T5_XL.revision}
    for converted in (entry.transformer, entry.vae):  # readable by another user (umask 022)
        assert stat.S_IMODE(converted.stat().st_mode) == 0o644, converted
    expected = load_transformer(official_files["transformer"]).state_dict()
    loaded = load_transformer(entry.transformer).state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    load_vae(entry.vae)

    from weights import load_pipeline

    load_pipeline(entry.transformer, entry.vae, entry.text_encoder)  # the T5 folder is complete


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path, official_files, monkeypatch):
    # huggingface_hub writes what it received in chunks of 10 MB: smaller ones, for a file of 0.7 MB
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 2**16)
    key = f"{INFINITY_REPO}/infinity_2b_reg.pth"
    hub.drop_once.add(key)
    download(tiny("2b"), tmp_path, endpoint=hub.url)
    assert (tmp_path / "infinity_2b_reg.pth").read_bytes() == official_files["transformer"].read_bytes()
    first, second = hub.gets(key)
    assert first.range is None
    assert second.range is not None and second.range.startswith("bytes=")
    assert int(second.range.removeprefix("bytes=").split("-")[0]) > 0  # resumed, not started over


def test_a_second_run_fetches_nothing_and_repairs_corrupted_files(hub, tmp_path, official_files):
    download(tiny("2b"), tmp_path, endpoint=hub.url)
    vae, config = tmp_path / "infinity_vae_d32reg.pth", tmp_path / "flan-t5-xl" / "config.json"
    good_vae, good_config = vae.read_bytes(), config.read_bytes()
    hub.requests.clear()
    download(tiny("2b"), tmp_path, endpoint=hub.url)
    assert hub.fetched() == set()  # complete, checked files are kept

    vae.write_bytes(good_vae[:100] + bytes([good_vae[100] ^ 1]) + good_vae[101:])  # same size, one bit off
    config.write_bytes(good_config[:-10])  # truncated
    download(tiny("2b"), tmp_path, endpoint=hub.url)
    assert hub.fetched() == {f"{INFINITY_REPO}/infinity_vae_d32reg.pth", f"{FLAN_T5_XL.repo_id}/config.json"}
    assert vae.read_bytes() == good_vae and config.read_bytes() == good_config


def test_a_file_still_wrong_after_a_second_download_is_an_error(hub, tmp_path):
    key = f"{INFINITY_REPO}/infinity_vae_d32reg.pth"
    hub.serve_corrupted.add(key)
    with pytest.raises(DownloadError, match=r"infinity_vae_d32reg\.pth: content hash .* after downloading it twice"):
        download(tiny("2b"), tmp_path, endpoint=hub.url)
    assert len(hub.gets(key)) == 2


def test_8b_fetches_its_shard_folder_and_converts_it(hub, tmp_path, tiny_transformer):
    model = replace(tiny("8b"), token_bits=None)  # the tiny VAE has no 2x2 patchify
    entry = download(model, tmp_path, convert_weights=True, endpoint=hub.url)
    infinity = {f.removeprefix(f"{INFINITY_REPO}/") for f in hub.fetched() if f.startswith(INFINITY_REPO)}
    assert infinity == {
        "infinity_8b_weights/pytorch_model-00001-of-00002.bin",
        "infinity_8b_weights/pytorch_model-00002-of-00002.bin",
        "infinity_8b_weights/pytorch_model.bin.index.json",
        "infinity_vae_d56_f8_14_patchify.pth",
    }
    assert entry.transformer == tmp_path / "infinity_8b_weights.safetensors"
    loaded = load_transformer(entry.transformer).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_transformer.state_dict().items())


def test_a_pinned_revision_is_used_and_a_missing_file_named(hub, tmp_path):
    entry = download(tiny("2b"), tmp_path / "old", revision=OLD_COMMIT, endpoint=hub.url)
    assert entry.commits[INFINITY_REPO] == OLD_COMMIT
    assert f"api/models/{INFINITY_REPO}/tree/{OLD_COMMIT}" in {r.repo_file for r in hub.requests}
    with pytest.raises(DownloadError, match=r"FoundationVision/Infinity@b{40} holds no file matching infinity_8b"):
        download(tiny("8b"), tmp_path / "old8b", revision=OLD_COMMIT, endpoint=hub.url)


def test_official_models_and_their_entry():
    assert list(OFFICIAL_MODELS) == ["2b", "8b", "8b-512"]
    assert OFFICIAL_MODELS["8b"].weights_repo().patterns == (
        "infinity_8b_weights/*",
        "infinity_vae_d56_f8_14_patchify.pth",
    )
    with pytest.raises(ValueError, match="unknown model '3b'; the official ones are: 2b, 8b, 8b-512"):
        official_model("3b")


def test_the_command_help_names_every_official_model(capsys):
    from server.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["download", "--help"])
    assert ", ".join(OFFICIAL_MODELS).replace(", 8b-512", " or 8b-512") in capsys.readouterr().out


def test_the_cli_downloads_through_hf_endpoint(serve_hub, tmp_path, infinity_files, t5_files, official_files):
    """The real command in a fresh process, the hub found through HF_ENDPOINT as a user would set it."""
    t5_state = {"shared.weight": torch.zeros(2, 2)}
    index = {"weight_map": {"shared.weight": "model-00001-of-00001.safetensors"}}
    save_file(t5_state, str(tmp_path / "shard.safetensors"))
    flan = {
        **{k: v for k, v in t5_files.items() if k != "model.safetensors"},
        "model-00001-of-00001.safetensors": (tmp_path / "shard.safetensors").read_bytes(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "spiece.model": b"sentencepiece",
        "special_tokens_map.json": b"{}",
        "pytorch_model.bin": b"not needed",
    }
    hub = serve_hub(
        FakeHub(
            {INFINITY_REPO: {COMMIT: infinity_files}, FLAN_T5_XL.repo_id: {FLAN_T5_XL.revision: flan}},
            branches={f"{INFINITY_REPO}@main": COMMIT},
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1"}
    dest = tmp_path / "weights"
    run = [sys.executable, "-m", "server.cli", "download", "2b", "--dir", str(dest), "--convert"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        f"# {INFINITY_REPO}@{COMMIT}, google/flan-t5-xl@{FLAN_T5_XL.revision}\n"
        "[[models]]\n"
        'name = "2b"\n'
        f'transformer = "{dest}/infinity_2b_reg.safetensors"\n'
        f'vae = "{dest}/infinity_vae_d32reg.safetensors"\n'
        f'text_encoder = "{dest}/flan-t5-xl"\n'
    )
    assert "pytorch_model.bin" not in os.listdir(dest / "flan-t5-xl")
    load_vae(dest / "infinity_vae_d32reg.safetensors")

    r = subprocess.run([*run[:4], "3b"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "the official ones are: 2b, 8b, 8b-512" in r.stderr


def test_the_entry_is_toml(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from weights.download import ModelEntry

    entry = ModelEntry("2b", tmp_path / 'a "b"', tmp_path / "v", tmp_path / "t", {INFINITY_REPO: COMMIT})
    parsed = tomllib.loads(entry.toml())
    assert parsed == {
        "models": [
            {
                "name": "2b",
                "transformer": str(tmp_path / 'a "b"'),
                "vae": str(tmp_path / "v"),
                "text_encoder": str(tmp_path / "t"),
            }
        ]
    }
