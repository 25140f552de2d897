"""The shipped default model: present, small, loadable, and still following prompts (CI bar)."""

import subprocess
import sys

from weights.default import DEFAULT_DIR, default_files_present


def test_the_default_model_is_shipped_and_small():
    assert default_files_present(DEFAULT_DIR), "weights/default/ is incomplete: run `infinity-serve train-default`"
    total = sum(p.stat().st_size for p in DEFAULT_DIR.rglob("*") if p.is_file())
    assert total < 40e6, total


def test_eval_on_a_small_prompt_subset_clears_the_ci_bar():
    # 8 prompts per category (the shipped model measures single colour 0.50, colour 0.875, overall 0.29
    # here; the VAE round trip 1.0, 1.0, 0.83); a random or broken model scores ~0, so these bars catch a
    # broken model or pipeline.
    r = subprocess.run([sys.executable, "-m", "server.cli", "eval", "--per-category", "8", "--min", "single colour=0.375",
                        "--min", "colour=0.5", "--min", "overall=0.15"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| overall |" in r.stdout
