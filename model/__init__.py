"""Infinity inference in plain PyTorch: configs, schedules, transformer, bitwise VAE, sampler, pipeline.

No HTTP and no pydantic here; devices and dtypes come from the caller.
"""
