"""`infinity-serve` command line: serve, generate, convert."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import (
    ATTENTION_CHOICES,
    ATTENTION_MODES,
    COMPILE_MODES,
    GUIDANCE_PRESETS,
    PRECISIONS,
    default_precision,
)
from model.schedules import LARGEST_PN, PN_NAMES  # plain Python: --help stays fast

if TYPE_CHECKING:  # commands import what they use when run: --help stays fast
    from model.image_condition import ImageCondition
    from server.settings import Settings

log = logging.getLogger("infinity_serve.cli")
MAX_CLI_PIXELS = 64 * 1024 * 1024  # --image: the user's own file, so a generous cap (the server's: a setting)


def _scale_values(text: str) -> float | tuple[float, ...]:
    """ "3" -> 3.0; "3,3,2.5" -> one value per scale (as the official --cfg / --tau accept)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1024x1024, got {text!r}") from None
    return w, h


def _attention_help() -> str:
    """Each mode with what it matches, in the model's own words (argparse %-formats help: % doubled)."""
    modes = " ".join(f"{name} = {text}." for name, text in ATTENTION_MODES.items())
    return f"cross-attention kernel (default auto). {modes}".replace("%", "%%")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one image from a prompt (and an input image)")
    p.add_argument("--prompt", default="", help="required, except with --image (a variation without a prompt)")
    p.add_argument("--out", type=Path, required=True, help="output image (.png, .jpg, .webp)")
    p.add_argument("--transformer", type=Path, help="official .pth, sharded folder or safetensors")
    p.add_argument("--vae", type=Path, help="official VAE .pth or safetensors")
    p.add_argument("--text-encoder", type=Path, help="T5 encoder directory (flan-t5-xl for official models)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--h-div-w", type=float, help="aspect ratio h/w, snapped to the nearest template")
    shape.add_argument("--size", type=_size, help="WIDTHxHEIGHT, snapped to the nearest template")
    p.add_argument("--pn", choices=PN_NAMES, help=f"pixel budget (default {LARGEST_PN})")
    p.add_argument("--cfg", type=_scale_values, default=3.0, help="guidance: one value or one per scale")
    p.add_argument("--tau", type=_scale_values, default=0.5, help="temperature: one value or one per scale")
    p.add_argument("--top-k", type=int, default=0, help="1 = greedy (seed-independent); 0 = off")
    p.add_argument("--top-p", type=float, default=0.97)
    p.add_argument(
        "--guidance", choices=GUIDANCE_PRESETS, default="full", help="skip-last: no guidance on the last scale (faster)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--dtype", choices=PRECISIONS, help="default: bfloat16 on CUDA (as the official run), float32 on CPU"
    )
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help=_attention_help())
    p.add_argument("--save-bits", type=Path, help="write the sampled bits of every scale to this .npz")
    img = p.add_argument_group("image-to-image (docs/image-to-image.md)")
    img.add_argument("--image", type=Path, help="input image to vary or edit (PNG, JPEG, WebP, ...)")
    img.add_argument("--mask", type=Path, help="with --image: PNG of its size; fully transparent pixels = edit here")
    img.add_argument(
        "--strength", type=float, help="0 = the input (through the VAE), 1 = ignore it; default 1 with --mask, else 0.6"
    )
    img.add_argument("--no-paste", dest="paste", action="store_false", help="with --mask: no paste-back outside it")
    p.set_defaults(func=_generate)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="write a checkpoint as safetensors with our names")
    p.add_argument("kind", choices=["transformer", "vae"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--token-bits", type=int, help="VAE only: the transformer's bits per token (56 for 8B)")
    p.set_defaults(func=_convert)


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch an official model from the Hugging Face hub (resumable, checked)")
    p.add_argument("model", help="2b, 8b or 8b-512 (weights.download.OFFICIAL_MODELS)")
    p.add_argument("--dir", type=Path, default=Path("weights"), help="download folder (default weights/)")
    p.add_argument("--revision", help="branch, tag or commit of FoundationVision/Infinity (default main)")
    p.add_argument("--convert", action="store_true", help="also write the transformer and VAE as safetensors")
    p.set_defaults(func=_download)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (flags override INFINITY_* environment variables)")
    p.add_argument("--transformer", type=Path)
    p.add_argument("--vae", type=Path)
    p.add_argument("--text-encoder", type=Path)
    p.add_argument(
        "--models",
        dest="models_file",
        type=Path,
        help="several models: a TOML file of [[models]] entries (docs/serving.md), instead of the three paths",
    )
    p.add_argument("--device", dest="devices", action="append", help="repeat for one replica per device")
    p.add_argument("--dtype", choices=PRECISIONS)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-wait-ms", type=float)
    p.add_argument(
        "--batching",
        choices=("static", "continuous"),  # Settings.batching's (pydantic is not imported for --help)
        help="static: a batch runs to its end; continuous: requests join at the next scale boundary",
    )
    p.add_argument("--max-queue", type=int)
    p.add_argument("--default-pn", choices=PN_NAMES)
    p.add_argument("--max-pn", choices=PN_NAMES)
    p.add_argument("--api-key", dest="api_keys", action="append", help="repeat for several keys")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=None,
        help="serve without --api-key on a non-loopback --host (refused otherwise)",
    )
    p.add_argument("--rate-limit", help='requests per authenticated key, else client address, e.g. "30/minute"')
    p.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        help="IP or CIDR whose X-Forwarded-For names the client (repeat for several)",
    )
    p.add_argument(
        "--compile", choices=COMPILE_MODES, help="torch.compile the transformer blocks (reduce-overhead: + CUDA graphs)"
    )
    p.add_argument("--no-warmup", dest="warmup", action="store_false", default=None)
    p.set_defaults(func=_serve)


def serve_settings(args: argparse.Namespace) -> Settings:
    """The `serve` flags given, over the INFINITY_* environment; raises pydantic's ValidationError."""
    from server.settings import Settings

    fields = (
        "transformer",
        "vae",
        "text_encoder",
        "models_file",
        "devices",
        "dtype",
        "host",
        "port",
        "max_batch_size",
        "max_wait_ms",
        "batching",
        "max_queue",
        "default_pn",
        "max_pn",
        "api_keys",
        "allow_unauthenticated",
        "rate_limit",
        "trusted_proxies",
        "compile",
        "warmup",
    )
    return Settings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.main import serve

    try:
        settings = serve_settings(args)
    except ValidationError as e:
        for err in e.errors():
            log.error("setting %s: %s", ".".join(str(p) for p in err["loc"]) or "-", err["msg"])
        return 2
    serve(settings)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-default", help="train the embedded default model from scratch (resumable)")
    p.add_argument("--workdir", type=Path, default=Path("runs/default-model"), help="checkpoints, caches, log")
    p.add_argument("--out", type=Path, default=Path("weights/default"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int)
    p.add_argument("--transformer-steps", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from training.build import train_default
    from training.recipe import Recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    recipe = Recipe(seed=args.seed)
    if args.vae_steps:
        recipe = replace(recipe, vae_training=replace(recipe.vae_training, steps=args.vae_steps))
    if args.transformer_steps:
        recipe = replace(
            recipe, transformer_training=replace(recipe.transformer_training, steps=args.transformer_steps)
        )
    log.info("training the default model: %s", recipe)
    train_default(args.workdir, args.out, recipe)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score the default model on seeded prompts (GenEval-style, shapes domain)")
    p.add_argument("--per-category", type=int, default=50)
    p.add_argument("--held-out", action="store_true", help="use only the templates kept out of training")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument(
        "--guidance", choices=GUIDANCE_PRESETS, default="full", help="skip-last: no guidance on the last scale"
    )
    p.add_argument("--weights", type=Path, help="a folder laid out like weights/default (default: the shipped one)")
    p.add_argument(
        "--min",
        dest="minimums",
        action="append",
        default=[],
        metavar="CATEGORY=VALUE",
        help='exit 1 if a score is lower, e.g. --min overall=0.6 --min "single colour=0.9"',
    )
    p.add_argument("--card", type=Path, help="also write the scores into this model card (markdown)")
    p.add_argument("--grid", type=Path, help="also save a captioned grid of sample images (PNG)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from model.config import RuntimeConfig
    from training.evaluate import evaluate, reconstruction_ceiling
    from training.recipe import IMAGE_SIZE
    from training.vae_training import validation_psnr
    from weights.default import DEFAULT_DIR, load_default_pipeline

    pipe, default = load_default_pipeline(RuntimeConfig(), args.weights or DEFAULT_DIR)
    if default.placeholder or default.schedule is None:
        log.error(
            "no trained default model in %s (train one with `infinity-serve train-default`)",
            args.weights or DEFAULT_DIR,
        )
        return 2
    report = evaluate(
        pipe, default.schedule, args.per_category, args.held_out, args.cfg, args.tau, guidance=args.guidance
    )
    ceiling = reconstruction_ceiling(pipe.vae, default.schedule, IMAGE_SIZE, args.per_category, args.held_out)
    vae_psnr = validation_psnr(pipe.vae, 32, default.schedule.scales)
    split = "held-out templates" if args.held_out else "training templates"
    print(
        f"# {args.per_category} prompts per category, {split}, cfg {args.cfg}, tau {args.tau}, "
        f"guidance {args.guidance}\n"
    )
    print(report.table(ceiling))
    print("\nVAE ceiling: the same scenes' renders encoded to bits and decoded (a perfect transformer's score).")
    print(f"\nVAE PSNR (held-out scenes, decoded from bits): {vae_psnr:.2f} dB")
    if args.card is not None:
        from training.card import write_card

        write_card(args.card, args.weights or DEFAULT_DIR, report, split, vae_psnr, ceiling)
    if args.grid is not None:
        from training.card import sample_grid

        sample_grid(pipe, default.schedule, args.grid)
    failed = 0
    for item in args.minimums:
        name, _, value = item.rpartition("=")
        if name not in report.accuracy:
            log.error("--min %s: unknown score; known: %s", item, ", ".join(report.accuracy))
            return 2
        if report.accuracy[name] < float(value):
            log.error("%s accuracy %.3f < required %s", name, report.accuracy[name], value)
            failed = 1
    return failed


def _schedule(args: argparse.Namespace):
    from model.schedules import ScaleSchedule, nearest_template, schedule_for_size

    if args.size is not None:
        width, height = args.size
        return schedule_for_size(width, height, pn=args.pn)
    template = nearest_template(args.h_div_w) if args.h_div_w is not None else 1.0
    return ScaleSchedule.official(template, args.pn or LARGEST_PN)


def _input_image(args: argparse.Namespace) -> ImageCondition | None:
    """--image (and --mask, --strength, --paste) as the engine's input; the server's checks and messages."""
    from server.errors import ServingError
    from server.uploads import image_condition

    if args.image is None:
        if args.mask is not None or args.strength is not None:
            raise ValueError("--mask and --strength need --image")
        return None
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
    mask = None if args.mask is None else args.mask.read_bytes()
    try:
        return image_condition(
            args.image.read_bytes(), mask, args.strength, args.paste, MAX_CLI_PIXELS, fields=("--image", "--mask")
        )
    except ServingError as e:
        raise ValueError(e.message.replace("`", "")) from None


def _generate(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from model.config import RuntimeConfig, SamplingParams
    from model.host_memory import retain_freed_memory
    from weights import load_pipeline
    from weights.default import load_default_pipeline

    retain_freed_memory()  # as `serve` does: no page faults on each large tensor of the decode
    condition = _input_image(args)
    if not args.prompt and condition is None:
        log.error("--prompt is required (it may be empty only with --image)")
        return 2
    paths = {n: getattr(args, n) for n in ("transformer", "vae", "text_encoder")}
    given = [n for n, v in paths.items() if v is not None]
    if given and len(given) < 3:
        missing = " ".join(f"--{n.replace('_', '-')}" for n, v in paths.items() if v is None)
        log.error("missing %s: give the transformer, VAE and text encoder paths (or none: the default model)", missing)
        return 2
    dtype = args.dtype or default_precision(args.device)
    runtime = RuntimeConfig(args.device, dtype, attention=args.attention)
    params = SamplingParams(
        cfg=args.cfg,
        tau=args.tau,
        top_k=args.top_k,
        top_p=args.top_p,
        guidance=args.guidance,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
    )
    if given:
        pipe, schedule = load_pipeline(args.transformer, args.vae, args.text_encoder, runtime), _schedule(args)
    else:
        pipe, default = load_default_pipeline(runtime)
        schedule = default.schedule or _schedule(args)
        if default.schedule is not None and (args.size or args.h_div_w or args.pn):
            log.warning(
                "the default model makes %dx%d images only: --size/--h-div-w/--pn ignored",
                *pipe.image_size(schedule)[::-1],
            )
    h, w = pipe.image_size(schedule)
    log.info(
        "generating %dx%d (template %s, pn %s, %d scales)", w, h, schedule.h_div_w, schedule.pn, schedule.num_scales
    )
    with tqdm(total=schedule.num_scales, desc="scales", unit="scale", file=sys.stderr) as bar:

        def advance(event) -> None:  # returns None: no row is dropped
            bar.update(1)

        result = pipe.generate([args.prompt], schedule, params, on_scale=advance, images=[condition])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0]).save(args.out)
    if args.save_bits is not None:
        arrays = {f"scale_{i:02d}": b for i, b in enumerate(result.bits)}
        # ignore: numpy's stub reads a **dict as possibly holding allow_pickle (a bool); ours holds arrays
        np.savez_compressed(args.save_bits, scales=np.array(schedule.scales), seed=np.array(result.seeds[0]), **arrays)  # type: ignore[arg-type]
    t = result.timings
    log.info(
        "wrote %s (seed %d): text %.2fs, transformer %.2fs, VAE %.2fs",
        args.out,
        result.seeds[0],
        t.text_encode,
        t.transformer,
        t.vae_decode,
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from weights.convert import convert

    convert(args.src, args.dst, args.kind, args.token_bits)
    return 0


def _download(args: argparse.Namespace) -> int:
    """Print the models-file entry on stdout (the log goes to stderr)."""
    from weights.download import download, official_model

    model = official_model(args.model)
    try:
        entry = download(model, args.dir, args.revision, args.convert)
    except OSError as e:  # the hub's HTTP errors, a file that fails its check twice, a full disk
        log.error("%s (run the same command again to resume)", e)
        return 1
    log.info(
        "serve it: infinity-serve serve --transformer %s --vae %s --text-encoder %s",
        entry.transformer,
        entry.vae,
        entry.text_encoder,
    )
    print(entry.toml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinity-serve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    _add_download(sub)
    _add_serve(sub)
    _add_train(sub)
    _add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError is a ValueError
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
