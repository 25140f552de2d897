"""The GPU check: one command, one table, within a time budget (docs/gpu-check.md).

    python -m tests.gpu.gpu_check --device cuda [--out gpu-check.md]   # a bare H200: ~8 minutes
    python -m tests.gpu.gpu_check --device cpu --quick                  # the same parts at tiny sizes (CI)

Parts, in this order, each in a child process with a timeout (a hang, a crash or an OOM is one
failed row, not a lost run):
1. the tests marked `cuda` (tests/gpu/) on the device, one row per test;
2. a real `serve` on the device (the embedded default model) answering one POST /generate with a
   PNG; skipped with a reason when the server's packages (the wheels) are not installed;
3. tests/bench/perf_bench's speed table: on CUDA the 2B and 8B shapes at 1024x1024, batch 1 and 8,
   compile off then reduce-overhead (stage times, peak memory, MFU against a timed matmul) and its
   targets; on CPU the tiny size at 0.06M. The optional part: what the budget leaves is cut.
Exit status 1 when a row failed or timed out.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# What `serve` needs beyond the H200's Python (torch, transformers, safetensors, numpy, pillow,
# prometheus-client, httpx, pytest): shipped as wheels beside the checkout (`make gpu-wheels`).
SERVER_MODULES = ("fastapi", "uvicorn", "pydantic_settings", "limits", "sse_starlette", "python_multipart")
RESERVE_S = 15.0  # kept back for writing the table


@dataclass
class Row:
    part: str
    check: str
    result: str  # pass | FAIL | skipped | timeout
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Plan:
    device: str
    tests_timeout_s: float
    serve_timeout_s: float
    perf: list[tuple[str, str]]  # (size, compile mode), run in this order while the budget lasts
    pns: str
    batches: str
    repeats: int

    @classmethod
    def for_device(cls, device: str, quick: bool) -> Plan:
        if device.startswith("cuda"):
            perf = [("2b", "off"), ("8b", "off"), ("2b", "reduce-overhead"), ("8b", "reduce-overhead")]
            return cls(device, 150.0, 120.0, perf[:1] if quick else perf, "1M", "1,8", 1)
        return cls(device, 90.0, 90.0, [("tiny", "off")], "0.06M", "1,8", 1)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def child_env(device: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "INFINITY_TEST_DEVICE": device}
    if not device.startswith("cuda"):
        # Tiny CPU work: one thread each, so that the check does not thrash on a busy CI machine.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ---- 0. environment ---------------------------------------------------------------------------
def environment(device: str) -> Row:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return Row("environment", "device", "FAIL", f"torch {torch.__version__}: CUDA not available")
        name = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        name = platform.processor() or platform.machine()
    absent = missing((*SERVER_MODULES, "flash_attn"))
    detail = (
        f"{name}; Python {platform.python_version()}, torch {torch.__version__}; "
        f"not installed: {', '.join(absent) or 'none'}"
    )
    return Row("environment", "device", "pass", detail)


# ---- 1. the tests marked cuda -----------------------------------------------------------------
def run_tests(plan: Plan, budget: Budget, tmp: Path) -> list[Row]:
    junit = tmp / "junit.xml"
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    command += ["-W", "ignore::pytest.PytestConfigWarning", f"--junitxml={junit}"]  # no pytest-timeout there
    timeout = min(plan.tests_timeout_s, budget.left())
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=child_env(plan.device), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return [Row("tests", "tests/gpu -m cuda", "timeout", f"killed after {timeout:.0f} s", timeout)]
    if not junit.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return [Row("tests", "tests/gpu -m cuda", "FAIL", " / ".join(tail), time.monotonic() - start)]
    rows = []
    for case in ET.parse(junit).iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            result, detail = "FAIL", (problem.get("message") or problem.tag).splitlines()[0][:300]
        elif skip is not None:
            result, detail = "skipped", skip.get("message") or ""
        else:
            result, detail = "pass", ""
        rows.append(Row("tests", case.get("name", "?"), result, detail, float(case.get("time", 0))))
    return rows or [Row("tests", "tests/gpu -m cuda", "FAIL", "no test collected", time.monotonic() - start)]


# ---- 2. a real serve --------------------------------------------------------------------------
def run_serve(plan: Plan, budget: Budget, tmp: Path) -> Row:
    absent = missing(SERVER_MODULES)
    if absent:
        return Row("serve", "POST /generate -> PNG", "skipped", f"install the wheels ({', '.join(absent)} missing)")
    import httpx
    from PIL import Image

    from tests.bench.load_test import start_server  # imports fastapi: only once it is known to be there
    from tests.server.conftest import free_port

    start, port, log = time.monotonic(), free_port(), tmp / "serve.log"
    extra = {"INFINITY_DEVICES": json.dumps([plan.device])}
    try:
        proc = start_server(port, max_queue=4, max_batch=1, log=log, extra_env=extra)
    except RuntimeError as e:
        return Row("serve", "POST /generate -> PNG", "FAIL", str(e).splitlines()[-1][:300], time.monotonic() - start)
    try:
        timeout = max(10.0, min(plan.serve_timeout_s, budget.left()) - (time.monotonic() - start))
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "a red circle", "seed": 1}, timeout=timeout)
        if r.status_code != 200:
            return Row("serve", "POST /generate -> PNG", "FAIL", f"HTTP {r.status_code}: {r.text[:200]}")
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["b64"])))
        ok = image.format == "PNG"
        detail = f"{image.format} {image.size[0]}x{image.size[1]} from `serve --device {plan.device}`"
        return Row("serve", "POST /generate -> PNG", "pass" if ok else "FAIL", detail, time.monotonic() - start)
    except httpx.TimeoutException:
        return Row("serve", "POST /generate -> PNG", "timeout", "no answer in time", time.monotonic() - start)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- 3. perf_bench's speed table --------------------------------------------------------------
def perf_args(plan: Plan, size: str, compile_mode: str) -> argparse.Namespace:
    """The namespace tests/bench/perf_bench.speed_table reads, as its command line would make it."""
    return argparse.Namespace(
        sizes=size,
        compile=compile_mode,
        pns=plan.pns,
        batches=plan.batches,
        dtype="bfloat16",
        batch_invariant="on",
        max_tflop=float("inf"),
        repeats=plan.repeats,
    )


def perf_worker(plan: Plan, size: str, compile_mode: str, out: Path) -> None:
    """Child process: one (size, compile mode) of perf_bench's speed table -> its rows as JSON."""
    from tests.bench import perf_bench

    with tempfile.TemporaryDirectory() as tmp:
        rows = perf_bench.speed_table(perf_args(plan, size, compile_mode), torch.device(plan.device), Path(tmp))
    out.write_text(json.dumps([asdict(r) for r in rows]))


def run_perf(plan: Plan, budget: Budget, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    measured = []
    for size, compile_mode in plan.perf:
        name = f"{size} {plan.pns} batch {plan.batches}, compile {compile_mode}"
        timeout = budget.left()
        if timeout < 30:
            rows.append(Row("perf", name, "skipped", "time budget spent"))
            continue
        out = tmp / f"perf-{size}-{compile_mode}.json"
        command = [sys.executable, "-m", "tests.gpu.gpu_check", "--device", plan.device, "--perf-one"]
        command += [f"{size}:{compile_mode}", "--perf-json", str(out)]
        start = time.monotonic()
        try:
            done = subprocess.run(
                command, cwd=ROOT, env=child_env(plan.device), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            rows.append(Row("perf", name, "timeout", f"cut at {timeout:.0f} s (time budget)", timeout))
            continue
        if done.returncode != 0 or not out.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            rows.append(Row("perf", name, "FAIL", tail[0][:300], time.monotonic() - start))
            continue
        for r in json.loads(out.read_text()):
            measured.append(r)
            detail = (
                f"{r['seconds'] / r['batch']:.3f} s/image; text {r['text']:.3f} s, transformer "
                f"{r['transformer']:.3f} s, VAE {r['vae']:.3f} s; peak {r['peak_mb']:.0f} MB; "
                f"matmul {r['matmul_tflops']:.1f} TFLOP/s, MFU {r['mfu']:.0%}"
            )
            label = f"{r['size']} {r['pn']} batch {r['batch']}, compile {r['compile']}"
            rows.append(Row("perf", label, "pass", detail, r["seconds"]))
    return rows + perf_targets(plan, measured)


def perf_targets(plan: Plan, measured: list[dict]) -> list[Row]:
    """perf_bench's own comparison with the targets (CUDA only: the CPU targets need its other parts)."""
    if not plan.device.startswith("cuda") or not measured:
        return []
    from tests.bench import perf_bench

    rows = [perf_bench.Row(**r) for r in measured]
    compiles = ",".join(dict.fromkeys(r.compile for r in rows))
    targets = perf_bench.compare(argparse.Namespace(compile=compiles), rows, torch.device(plan.device), True)
    # A missed target is a finding to record, not a broken path: "pass" means measured.
    return [
        Row("target", label, "pass", f"{value} (wanted {wanted}: {'met' if met else 'NOT met'})")
        for label, value, wanted, met in targets
    ]


# ---- the table --------------------------------------------------------------------------------
def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| part | check | result | detail | s |", "|---|---|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "/")
        lines.append(f"| {r.part} | {r.check} | {r.result} | {detail} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="CUDA: the 2B compile-off perf only; CPU: as without")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole check stops within this (default 8 min)")
    p.add_argument("--out", type=Path, default=Path("gpu-check.md"), help="the table is also written here")
    p.add_argument("--perf-one", help=argparse.SUPPRESS)  # SIZE:COMPILE, in the child process
    p.add_argument("--perf-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    plan = Plan.for_device(args.device, args.quick)
    if args.perf_one:
        size, compile_mode = args.perf_one.split(":")
        perf_worker(plan, size, compile_mode, args.perf_json)
        return 0

    started, budget = time.monotonic(), Budget(args.budget_s)
    rows = [environment(args.device)]
    if rows[0].result == "pass":
        with tempfile.TemporaryDirectory() as tmp:
            rows += run_tests(plan, budget, Path(tmp))
            rows.append(run_serve(plan, budget, Path(tmp)))
            rows += run_perf(plan, budget, Path(tmp))
    failed = [r for r in rows if r.result in ("FAIL", "timeout")]
    header = (
        f"# GPU check {time.strftime('%Y-%m-%d %H:%M')} on {args.device}: {len(rows)} rows, "
        f"{len(failed)} failed or timed out, {time.monotonic() - started:.0f} s"
    )
    text = table(rows, header)
    print(text, flush=True)
    args.out.write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
