"""The layers, in both directions.

model/    plain PyTorch: knows nothing of ours above it, nor of HTTP;
weights/  checkpoints: uses the model, never the server or the training package;
training/ trains the default model: a consumer of model/ and weights/, as the server is;
server/   HTTP: uses only the model's public API (config, schedules, pipeline, and ImageCondition of
          image_condition), and loads the training package only lazily, inside the CLI's train/eval
          subcommands.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEB = {
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "prometheus_client",
    "httpx",
    "sse_starlette",
    "limits",
}
# model.image_condition: for its ImageCondition, the public dataclass of an input image (the server
# builds one per image-to-image request; the model's helpers there are not for the server).
# model.host_memory: the process's host allocator setting, which `serve` applies before its workers start.
MODEL_PUBLIC_API = {
    "model",
    "model.config",
    "model.schedules",
    "model.pipeline",
    "model.image_condition",
    "model.host_memory",
}


def imports_of(package: str, top_level_only: bool = False) -> dict[str, set[str]]:
    """Full module names imported by each file of `package` (module-level statements only if asked)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(package: str, forbidden: set[str], top_level_only: bool = False) -> dict[str, list[str]]:
    bad = {}
    for file, names in imports_of(package, top_level_only).items():
        hits = sorted(n for n in names if n.split(".")[0] in forbidden)
        if hits:
            bad[file] = hits
    return bad


def test_model_knows_nothing_above_it():
    assert not offending("model", WEB | {"server", "weights", "training"})


def test_weights_never_imports_the_server_or_training():
    assert not offending("weights", WEB | {"server", "training"})


def test_training_is_a_consumer_not_a_server_part():
    assert not offending("training", WEB | {"server"})


def test_server_imports_training_only_lazily_in_the_cli():
    assert not offending("server", {"training"}, top_level_only=True)
    lazy = {f for f, names in offending("server", {"training"}).items()}
    assert lazy <= {"server/cli.py"}, lazy


def test_server_uses_only_the_models_public_api():
    bad = {
        f: sorted(n for n in names if n.split(".")[0] == "model" and n not in MODEL_PUBLIC_API)
        for f, names in imports_of("server").items()
    }
    assert not {f: n for f, n in bad.items() if n}, bad


def test_the_server_takes_only_the_input_image_dataclass_from_image_condition():
    names = set()
    for path in (ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "model.image_condition":
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                assert "model.image_condition" not in {a.name for a in node.names}, path
    assert names == {"ImageCondition"}, names


def test_the_checks_see_imports():
    """The walker finds nested and dotted imports (an empty result must mean clean, not blind)."""
    found = imports_of("server")
    assert "model.pipeline" in found["server/main.py"]
    assert any(n.startswith("training.") for n in found["server/cli.py"])
