"""The shipped default model: present, small, loadable, and still following prompts (CI bar)."""

import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from weights.default import DEFAULT_DIR, default_files_present


def test_the_default_model_is_shipped_and_small():
    assert default_files_present(DEFAULT_DIR), "weights/default/ is incomplete: run `infinity-serve train-default`"
    total = sum(p.stat().st_size for p in DEFAULT_DIR.rglob("*") if p.is_file())
    assert total < 40e6, total


# 8 prompts per category. The shipped model measures single 0.75, single colour 1.0, colour 1.0, two 0.5,
# overall 0.69 there (the VAE round trip 1.0, 1.0, 1.0, 0.625, 0.67); each bar leaves a prompt or two of margin.
CI_BARS = [
    "--min",
    "single=0.6",
    "--min",
    "single colour=0.75",
    "--min",
    "colour=0.75",
    "--min",
    "two=0.375",
    "--min",
    "overall=0.45",
]


def _eval(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "--per-category", "8", *CI_BARS, *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_eval_on_a_small_prompt_subset_clears_the_ci_bar():
    r = _eval()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| overall |" in r.stdout


def test_the_ci_bar_fails_a_broken_model(tmp_path):
    """Power: the shipped files with the transformer's weights shuffled within each tensor (same names,
    shapes and statistics, no learned structure) must fail the same bars (measured: single 0, single colour 0,
    colour 0, overall 0)."""
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_DIR, broken)
    g = torch.Generator().manual_seed(0)
    weights = load_file(broken / "transformer.safetensors")
    shuffled = {k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v) for k, v in weights.items()}
    save_file(shuffled, broken / "transformer.safetensors", metadata={"format": "infinity-serve"})
    r = _eval("--weights", str(broken))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "accuracy" in r.stderr and "< required" in r.stderr
