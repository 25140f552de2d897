"""Prompts the benchmarks send: the default model's domain, a mix of lengths. Its own module, so that
perf_bench (run on a bare GPU machine) needs nothing of the web stack that server_bench imports."""

PROMPTS = ["a red circle", "two blue squares", "a green star to the left of a red circle", "three yellow triangles"]
