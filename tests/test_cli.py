"""The `infinity-serve` command line, run as a real subprocess on tiny official-layout files."""

import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
from PIL import Image


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(official_files, t5_dir):
    return [
        "--transformer",
        str(official_files["transformer"]),
        "--vae",
        str(official_files["vae"]),
        "--text-encoder",
        str(t5_dir),
    ]


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("infinity-serve") == "server.cli:main"


def test_generate_writes_a_png_and_the_bits(tmp_path, files):
    out, bits = tmp_path / "img.png", tmp_path / "bits.npz"
    r = cli(
        "generate",
        "--prompt",
        "a red circle",
        "--out",
        str(out),
        "--pn",
        "0.06M",
        "--seed",
        "7",
        "--save-bits",
        str(bits),
        "--cfg",
        "3",
        "--tau",
        "0.5,0.5,0.5,0.5,0.5,0.5,1",
        *files,
    )
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    saved = np.load(bits)
    assert saved["scales"].tolist() == [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16]]
    assert saved["scale_06"].shape == (1, 16, 16, 8) and saved["scale_06"].dtype == np.uint8
    assert int(saved["seed"]) == 7
    assert "scales: 100%" in r.stderr  # progress bar over scales


def test_greedy_generation_ignores_the_seed_and_sizes_snap(tmp_path, files):
    results = []
    for seed in ("1", "2"):
        out, bits = tmp_path / f"g{seed}.png", tmp_path / f"g{seed}.npz"
        r = cli(
            "generate",
            "--prompt",
            "two blue squares",
            "--out",
            str(out),
            "--size",
            "330x200",
            "--pn",
            "0.06M",
            "--top-k",
            "1",
            "--seed",
            seed,
            "--save-bits",
            str(bits),
            *files,
        )
        assert r.returncode == 0, r.stderr
        results.append((np.asarray(Image.open(out)), np.load(bits)))
    (img1, bits1), (img2, bits2) = results
    assert img1.shape == (12 * 4, 21 * 4, 3)  # 0.571 template at 0.06M, tiny VAE stride 4
    assert np.array_equal(img1, img2)
    assert all(np.array_equal(bits1[k], bits2[k]) for k in bits1.files if k.startswith("scale"))


def test_generate_without_weights_uses_the_default_model(tmp_path):
    out = tmp_path / "default.png"
    r = cli("generate", "--prompt", "a red circle", "--out", str(out), "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[0] >= 64


def test_convert_then_generate_from_safetensors(tmp_path, files, official_files, t5_dir):
    t_st, v_st = tmp_path / "t.safetensors", tmp_path / "v.safetensors"
    assert cli("convert", "transformer", str(official_files["transformer"]), str(t_st)).returncode == 0
    assert cli("convert", "vae", str(official_files["vae"]), str(v_st)).returncode == 0
    args = ["generate", "--prompt", "a star", "--pn", "0.06M", "--top-k", "1"]
    r1 = cli(*args, "--out", str(tmp_path / "a.png"), *files)
    r2 = cli(
        *args,
        "--out",
        str(tmp_path / "b.png"),
        "--transformer",
        str(t_st),
        "--vae",
        str(v_st),
        "--text-encoder",
        str(t5_dir),
    )
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_errors_are_clear_and_exit_nonzero(tmp_path, files):
    r = cli("generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--transformer", files[1])
    assert r.returncode == 2 and "missing --vae --text-encoder" in r.stderr
    r = cli(
        "generate",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.png"),
        "--transformer",
        str(tmp_path / "nope.pth"),
        "--vae",
        "v",
        "--text-encoder",
        "t",
    )
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
    r = cli("generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--cfg", "three", *files)
    assert r.returncode == 2 and "comma-separated numbers" in r.stderr
    r = cli("generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--pn", "0.06M", "--tau", "0", *files)
    assert r.returncode == 2 and "`tau` must be > 0" in r.stderr


def test_pixel_budget_flags_offer_the_models_list():
    import argparse

    from model.schedules import PN_NAMES
    from server.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, flag in (("generate", "--pn"), ("serve", "--default-pn"), ("serve", "--max-pn")):
        action = next(a for a in commands[command]._actions if flag in a.option_strings)
        assert list(action.choices) == list(PN_NAMES), (command, flag)


def test_serve_refuses_a_key_less_public_host_before_loading_anything():
    r = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert r.returncode == 2
    assert "api_keys is empty: set api_keys, or allow_unauthenticated=true (--allow-unauthenticated)" in r.stderr


def test_serve_security_flags_reach_the_settings():
    from server.cli import build_parser, serve_settings

    args = build_parser().parse_args(
        [
            "serve",
            "--host",
            "0.0.0.0",
            "--allow-unauthenticated",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "192.0.2.7",
        ]
    )
    settings = serve_settings(args)
    assert settings.allow_unauthenticated and settings.trusted_proxies == ["10.0.0.0/8", "192.0.2.7"]
    plain = serve_settings(build_parser().parse_args(["serve"]))
    assert not plain.allow_unauthenticated and plain.trusted_proxies == []


def test_generate_from_an_input_image_with_a_mask_and_a_strength(tmp_path, files):
    source = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # the schedule's size
    Image.fromarray(source).save(tmp_path / "in.png")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 32:] = 0  # OpenAI's mask: fully transparent = edit here (the right half)
    Image.fromarray(np.dstack([source, alpha]), "RGBA").save(tmp_path / "mask.png")
    common = ["generate", "--pn", "0.06M", "--image", str(tmp_path / "in.png"), *files]
    r = cli(
        *common, "--prompt", "two blue squares", "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "e.png")
    )
    assert r.returncode == 0, r.stderr
    edited = np.asarray(Image.open(tmp_path / "e.png"))
    assert np.array_equal(edited[:, :29], source[:, :29]) and not np.array_equal(edited[:, 36:], source[:, 36:])
    exact = []
    for seed in ("1", "2"):  # strength 0, no prompt: the VAE round trip, whatever the seed
        r = cli(*common, "--strength", "0", "--seed", seed, "--out", str(tmp_path / f"v{seed}.png"))
        assert r.returncode == 0, r.stderr
        exact.append(np.asarray(Image.open(tmp_path / f"v{seed}.png")))
    assert np.array_equal(exact[0], exact[1])
    Image.fromarray(source).save(tmp_path / "opaque.png")
    r = cli(*common, "--mask", str(tmp_path / "opaque.png"), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "--mask has no alpha channel" in r.stderr
    r = cli(*common[:3], "--prompt", "x", "--strength", "0.5", "--out", str(tmp_path / "x.png"), *files)
    assert r.returncode == 2 and "--mask and --strength need --image" in r.stderr
    r = cli("generate", "--out", str(tmp_path / "x.png"), *files)
    assert r.returncode == 2 and "--prompt is required" in r.stderr
