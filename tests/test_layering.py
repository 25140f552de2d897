"""The model never knows about HTTP; the server talks to it only through its public API."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports_of(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_model_imports_no_web_stack_and_no_other_package_of_ours():
    forbidden = {"fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client",
                 "httpx", "server", "weights"}
    bad = {f: sorted(n & forbidden) for f, n in imports_of("model").items() if n & forbidden}
    assert not bad, bad


def test_weights_does_not_import_the_server():
    bad = {f: n for f, n in imports_of("weights").items() if {"server", "fastapi"} & n}
    assert not bad, bad
