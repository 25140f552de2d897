"""A CPU pipeline run on another thread than the one that built it, while that one lives, is warned
about once (model/cpu_threads.py): it halves CPU speed."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch

from model.config import SamplingParams
from model.cpu_threads import BuildingThread
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder

WARNING = "two OpenMP pools"


def in_thread(fn):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0] if result else None


def warned(caplog) -> int:
    return sum(WARNING in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_running_on_another_thread_while_the_builder_lives_warns_once(caplog):
    built = BuildingThread(torch.device("cpu"))  # built here: this thread lives on
    built.check()
    assert warned(caplog) == 0  # the building thread itself
    in_thread(built.check)
    in_thread(built.check)
    assert warned(caplog) == 1


def test_no_warning_once_the_building_thread_has_exited_or_off_cpu(caplog):
    built = in_thread(lambda: BuildingThread(torch.device("cpu")))  # as `serve` builds
    built.check()
    in_thread(built.check)
    on_gpu = BuildingThread(torch.device("cuda"))
    in_thread(on_gpu.check)
    assert warned(caplog) == 0


def test_the_pipeline_checks_on_every_run(caplog, t5_dir, tiny_transformer, tiny_vae):
    pipe = InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))
    schedule = ScaleSchedule.official(1.0, "0.06M")
    in_thread(lambda: pipe.generate(["a red circle"], schedule, SamplingParams(seed=0)))
    assert warned(caplog) == 1
