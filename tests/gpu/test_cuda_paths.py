"""The CUDA paths, checked on a tiny model loaded from official-layout checkpoint files.

The device comes from INFINITY_TEST_DEVICE (default "cpu"): CI runs these same checks on the CPU,
where "CPU vs device" is CPU vs CPU and compile uses mode "default" (CUDA graphs are CUDA-only);
`python -m tests.gpu.gpu_check --device cuda` runs them on a GPU. Model code only: nothing here
imports `server/`, so the checks run on a machine without the server's packages.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.attention import stack_memories
from model.config import RuntimeConfig, SamplingParams
from model.kv_cache import KVCache
from model.pipeline import GenerationResult, InfinityPipeline
from model.schedules import ScaleSchedule
from weights.pipeline import load_pipeline

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("INFINITY_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE.startswith("cuda")
SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # 7 scales, 16x16 tokens at the last
PROMPTS = ["a red circle", "two blue squares to the left of a star", "a star", "three big green triangles"]
# bf16 rounds each block's output to 8 bits of mantissa; the cached and teacher-forced paths round at
# different places (other shapes, other kernels), so their logits agree to bf16 precision only.
LOGIT_TOLERANCE = {"float32": 2e-5, "bfloat16": 6e-2}


@pytest.fixture(scope="module")
def pipelines(official_files, t5_dir):
    """One pipeline per RuntimeConfig, loaded once from the tiny official-format files."""
    made: dict[RuntimeConfig, InfinityPipeline] = {}

    def get(runtime: RuntimeConfig) -> InfinityPipeline:
        if runtime not in made:
            made[runtime] = load_pipeline(official_files["transformer"], official_files["vae"], t5_dir, runtime)
        return made[runtime]

    return get


def run(pipe: InfinityPipeline, prompts: list[str], params: list[SamplingParams]) -> GenerationResult:
    return pipe.generate(prompts, SCHEDULE, params)


def agreement(a: GenerationResult, b: GenerationResult, row_a: int = 0, row_b: int = 0) -> list[float]:
    """Fraction of equal bits per scale between row_a of `a` and row_b of `b`."""
    return [float(np.mean(x[row_a] == y[row_b])) for x, y in zip(a.bits, b.bits, strict=True)]


def fmt(fractions: list[float]) -> str:
    return ", ".join(f"{f:.4f}" for f in fractions)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_logits_equal_teacher_forced_logits(pipelines, dtype):
    pipe = pipelines(RuntimeConfig(device=DEVICE, dtype=dtype, attention="sdpa", text_dtype="float32"))
    model, quantizer = pipe.transformer, pipe.vae.quantizer
    recorded: list[torch.Tensor] = []
    step = model.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        recorded.append(out)
        return out

    model.step = recording_step  # this instance only, undone below
    try:
        out = run(pipe, PROMPTS[:2], [SamplingParams(cfg=3.0, tau=1.0, seed=s) for s in (1, 2)])
    finally:
        del model.step
    bits = [torch.from_numpy(b).to(pipe.device).long() for b in out.bits]
    inputs = quantizer.teacher_inputs(bits, SCHEDULE.vae_scales(quantizer.config.spatial_patchify))
    with torch.inference_mode():
        memory = pipe.text_encoder.encode(PROMPTS[:2]).memory
        forced = model(model.condition(memory), SCHEDULE, inputs)
        forced_uncond = model(model.condition(model.unconditional_text(memory.lengths)), SCHEDULE, inputs)
    tol = LOGIT_TOLERANCE[dtype]
    for si, cached in enumerate(recorded):
        assert torch.isfinite(cached).all(), f"scale {si}: non-finite cached logits"
        torch.testing.assert_close(cached[:2], forced[si], atol=tol, rtol=tol, msg=lambda m, si=si: f"scale {si}: {m}")
        torch.testing.assert_close(
            cached[2:], forced_uncond[si], atol=tol, rtol=tol, msg=lambda m, si=si: f"scale {si} (uncond): {m}"
        )


def test_cpu_and_device_give_the_same_bits_in_float32(pipelines):
    # Greedy (top_k=1): the bits depend on the logits alone, not on the device's random stream
    # (a CUDA generator draws other numbers than a CPU one from the same seed).
    runtime = RuntimeConfig(device="cpu", dtype="float32", attention="sdpa", text_dtype="float32")
    params = [SamplingParams(cfg=3.0, top_k=1, seed=s) for s in (1, 2)]
    cpu = run(pipelines(runtime), PROMPTS[:2], params)
    dev = run(pipelines(replace(runtime, device=DEVICE)), PROMPTS[:2], params)
    for row in range(2):
        equal = agreement(cpu, dev, row, row)
        assert min(equal) == 1.0, f"row {row}: bits equal per scale, CPU vs {DEVICE}: {fmt(equal)}"


def test_compiled_blocks_give_the_eager_bits(pipelines):
    # reduce-overhead adds CUDA graphs, which exist on CUDA only: the CPU run checks mode "default".
    mode = "reduce-overhead" if ON_CUDA else "default"
    runtime = RuntimeConfig(device=DEVICE, dtype="float32", attention="sdpa", text_dtype="float32")
    schedule = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4), (8, 8)))  # fewer shapes to compile for
    torch._dynamo.reset()
    params = [SamplingParams(cfg=3.0, tau=1.0, seed=s) for s in (1, 2, 3)]
    for batch in (1, 3):  # batch 1 is specialised apart from the others
        eager = pipelines(runtime).generate(PROMPTS[:batch], schedule, params[:batch])
        compiled = pipelines(replace(runtime, compile=mode)).generate(PROMPTS[:batch], schedule, params[:batch])
        for row in range(batch):
            equal = agreement(eager, compiled, row, row)
            assert min(equal) == 1.0, f"batch {batch} row {row}: bits equal per scale, off vs {mode}: {fmt(equal)}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_a_seed_gives_the_same_bits_alone_and_in_a_batch(pipelines, dtype, attention):
    # Other prompt lengths around it: another batch count and another padded text length.
    pipe = pipelines(RuntimeConfig(device=DEVICE, dtype=dtype, attention=attention))
    alone = run(pipe, [PROMPTS[2]], [SamplingParams(cfg=3.0, tau=1.0, seed=7)])
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[2], PROMPTS[0]]
    params = [SamplingParams(cfg=c, tau=1.0, seed=s) for c, s in ((1.0, 5), (5.0, 6), (3.0, 7), (3.0, 8))]
    together = run(pipe, prompts, params)
    equal = agreement(alone, together, 0, 2)
    assert min(equal) == 1.0, f"bits equal per scale, alone vs row 2 of 4 ({dtype}, {attention}): {fmt(equal)}"
    assert np.array_equal(alone.images[0], together.images[2]), "same bits, other pixels"


def test_a_scale_step_replays_as_a_graph_with_the_eager_logits(pipelines):
    """A whole scale step (every block, KV-cache write, cross-attention, head) has no host sync and
    no host-to-device copy after scale 0 (tests/model/test_syncs.py), so CUDA can capture it. On CUDA:
    scale 1 captured with torch.cuda.graph and replayed over the same cache offsets gives the eager
    logits. On CPU the same steps run eagerly twice (what a replay relies on: rewriting a scale's
    cache slots in place gives the same numbers). Not yet run on a GPU."""
    pipe = pipelines(RuntimeConfig(device=DEVICE, dtype="float32", attention="sdpa", text_dtype="float32"))
    model, backend = pipe.transformer, pipe.backend
    with torch.inference_mode():
        memory = pipe.text_encoder.encode(PROMPTS[:2]).memory
        cond = model.condition(stack_memories(memory, model.unconditional_text(memory.lengths)), backend)
        ca_kv, c = model.cross_kv(cond), model.config
        cache = KVCache.allocate(
            c.depth, 4, c.num_heads, SCHEDULE.total_tokens, c.head_dim, model.blocks_dtype, pipe.device
        )
        model.step(model.start_tokens(cond), 0, SCHEDULE, cond, ca_kv, cache, backend)  # builds the request's indices
        x = torch.randn(4, SCHEDULE.lengths[1], c.width, device=pipe.device, generator=torch.Generator(pipe.device))

        def step() -> torch.Tensor:
            cache.filled = SCHEDULE.offsets[1]  # a replay writes the same slots again
            return model.step(x, 1, SCHEDULE, cond, ca_kv, cache, backend)

        eager = step().clone()
        if ON_CUDA:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # warm-up on a side stream, as capture requires
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            graph.replay()
            torch.cuda.synchronize()
        else:
            out = step()
    assert torch.equal(out, eager)
