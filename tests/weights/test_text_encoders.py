"""Models that name the same text encoder share one copy (weights/text_encoders.py), and sharing it
across threads is safe."""

from __future__ import annotations

import threading

import torch

from server.main import build_models
from server.settings import Settings
from weights.text_encoders import TextEncoders


def test_one_encoder_per_folder_device_dtype_and_length(t5_dir):
    encoders = TextEncoders()
    first = encoders.get(t5_dir, "cpu", None, 64)
    assert encoders.get(t5_dir.parent / ".." / t5_dir.parent.name / t5_dir.name, "cpu", torch.float32, 64) is first
    assert encoders.get(t5_dir, "cpu", torch.bfloat16, 64) is not first
    assert encoders.get(t5_dir, "cpu", None, 32) is not first
    assert len(encoders) == 3


def test_models_of_one_server_naming_the_same_t5_load_it_once(tmp_path, official_files, t5_dir):
    entry = 'transformer = "{transformer}"\nvae = "{vae}"\ntext_encoder = "{t5}"\n'.format(t5=t5_dir, **official_files)
    (tmp_path / "models.toml").write_text(f'[[models]]\nname = "a"\n{entry}\n[[models]]\nname = "b"\n{entry}')
    models = build_models(Settings(models_file=tmp_path / "models.toml", warmup=False))
    try:
        a, b = (models.pick(name).engine.replicas[0].pipeline for name in ("a", "b"))
        assert a.text_encoder is b.text_encoder
        assert a.transformer is not b.transformer  # the rest stays each model's own
    finally:
        models.drain(5)


def test_a_shared_encoder_encodes_from_several_threads_at_once(t5_dir):
    """Each model's worker calls the shared encoder on its own thread: tokenizer, T5 and the feature
    cache must give every thread what it would get alone."""
    encoder = TextEncoders().get(t5_dir, "cpu", None, 64)
    prompts = [f"a red circle {i} " * (1 + i % 7) for i in range(120)]
    expected = {p: encoder._encode_one(p) for p in prompts[:8]}
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for p in prompts[offset::4]:
                features = encoder.encode([p]).memory.features[0]
                if p in expected:
                    assert torch.equal(features, expected[p])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
