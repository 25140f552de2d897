"""Start-up: settings -> per model, pipelines on every device and a warmed engine -> app -> uvicorn.

Loading and warm-up finish before the port opens, so a listening server is a ready one. On
SIGTERM/SIGINT the engine stops admitting (503, /readyz false), queued requests get 503, running work
finishes, and the process exits, all within one `drain_timeout_s` deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version

import uvicorn
from fastapi import FastAPI

from model.config import RuntimeConfig
from model.host_memory import retain_freed_memory
from model.pipeline import InfinityPipeline
from model.schedules import LARGEST_PN
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.models import ServedModel, ServedModels
from server.models_file import ModelSpec
from server.service import ModelLimits
from server.settings import Settings
from weights.default import DEFAULT_DIR, load_default_pipeline
from weights.pipeline import load_pipeline
from weights.text_encoders import TextEncoders

log = logging.getLogger(__name__)


def _runtime(settings: Settings, device: str) -> RuntimeConfig:
    return RuntimeConfig(
        device=device,
        dtype=settings.dtype_for(device),
        attention=settings.attention,
        compile=settings.compile,
        batch_invariant=settings.batch_invariant,
        preview=settings.preview,
        vae_decode=settings.vae_decode,
    )


def load_pipelines(
    settings: Settings, spec: ModelSpec | None = None, text_encoders: TextEncoders | None = None
) -> tuple[dict[str, InfinityPipeline], ModelLimits]:
    """One pipeline per device. `spec`: an entry of the models file (its name, its weights), loaded
    with `settings` already carrying its overrides; None: the model of the flags (or the default).
    `text_encoders`: shared across the models of one server, so that the same T5 is loaded once."""
    pipelines: dict[str, InfinityPipeline] = {}
    name = spec.name if spec is not None else settings.model_name
    limits = ModelLimits(name, settings.default_pn or LARGEST_PN, settings.max_pn or LARGEST_PN)
    paths = spec.weight_paths if spec is not None else settings.weight_paths
    root = spec.weights if spec is not None and spec.weights is not None else DEFAULT_DIR
    for device in settings.devices:
        if paths is None:
            pipelines[device], default = load_default_pipeline(_runtime(settings, device), root, text_encoders)
            limits = ModelLimits(
                default.name if spec is None else spec.name,
                settings.default_pn or default.default_pn,
                settings.max_pn or default.max_pn,
                default.schedule,
            )
        else:
            pipelines[device] = load_pipeline(*paths, _runtime(settings, device), text_encoders=text_encoders)
    return pipelines, limits


def in_own_thread(fn, *args):
    """fn(*args) in a short-lived thread. Why: an OpenMP thread pool belongs to the thread that first
    runs a parallel torch op and lives until that thread exits. Torch work on the main thread (loading)
    plus the replica worker's own pool oversubscribe the cores, and libgomp then stops spinning between
    ops: CPU generation measured 1.65x slower (default model, 2 cores). So the main thread (the HTTP
    event loop) does no torch work: loading runs here, warm-up and generation in the worker."""
    with ThreadPoolExecutor(1, thread_name_prefix="load") as pool:
        return pool.submit(fn, *args).result()


def build_engine(
    settings: Settings,
    metrics: Metrics | None = None,
    spec: ModelSpec | None = None,
    text_encoders: TextEncoders | None = None,
) -> tuple[Engine, ModelLimits]:
    """One model's warmed engine (`spec`: an entry of the models file, `settings` with its overrides)."""
    pipelines, limits = in_own_thread(load_pipelines, settings, spec, text_encoders)
    engine = Engine(
        pipelines,
        (metrics or Metrics()).for_model(limits.name),  # its series carry the name requests pick it by
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.max_queue,
        settings.memory_budget_bytes,
        settings.worker_restarts,
        batching=settings.batching,
    )
    engine.start(
        warmup=limits.warmup_schedule if settings.warmup else None,
        warmup_batches=(1, settings.max_batch_size) if settings.compile != "off" else (1,),
    )
    log.info(
        "model %s: %s batching, up to %d images %s, queue bound %d",
        limits.name,
        settings.batching,
        settings.max_batch_size,
        "in flight" if settings.batching == "continuous" else "per batch",
        settings.max_queue,
    )
    return engine, limits


def build_models(settings: Settings, metrics: Metrics | None = None) -> ServedModels:
    """Every model of the models file (or the one of the flags), each with its own engine, in order."""
    metrics = metrics or Metrics()
    specs = settings.model_specs()
    text_encoders = TextEncoders()  # models naming the same T5 folder (and device, dtype) share it
    served: list[ServedModel] = []
    try:
        if specs is None:
            engine, limits = build_engine(settings, metrics)
            served.append(ServedModel(limits, engine))
        for spec in specs or ():
            log.info("loading model %s", spec.name)
            engine, limits = build_engine(settings.for_model(spec), metrics, spec, text_encoders)
            served.append(ServedModel(limits, engine))
    except BaseException:
        for model in served:  # the ones already running: stop their workers
            model.engine.drain(0)
        raise
    try:
        package_version = version("infinity-serve")
    except PackageNotFoundError:
        package_version = "dev"
    names = ",".join(m.name for m in served)
    devices = ",".join(dict.fromkeys(r.device for m in served for r in m.engine.replicas))
    metrics.build.info({"version": package_version, "model": names, "devices": devices})
    return ServedModels(served)


class DrainingServer(uvicorn.Server):
    """First signal: one drain deadline (`drain_timeout`) for the whole shutdown. Queued requests get
    503 at once, running batches finish, then uvicorn closes connections and the lifespan stops the
    workers, each with only what is left of that deadline: the process exits within it (plus a
    second), inside Kubernetes' grace period. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine | ServedModels, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # second signal: exit now
            return super().handle_exit(sig, frame)
        self._draining = True
        deadline = time.monotonic() + self.drain_timeout
        refused = self.engine.begin_drain(deadline)
        log.info(
            "signal %s: draining for up to %.0fs; %d queued requests refused with 503, new ones too",
            sig,
            self.drain_timeout,
            refused,
        )

        def finish() -> None:
            finished = self.engine.wait_idle(max(0.0, deadline - time.monotonic()))
            if not finished:
                log.warning("drain deadline passed with work running: it is cancelled")
            # uvicorn's wait for open connections gets what is left; past it, it cancels the handlers,
            # which cancel their engine tickets (service.wait_for_output).
            # ignore: uvicorn annotates whole seconds, but hands the value to asyncio.wait_for (a float)
            self.config.timeout_graceful_shutdown = max(0.1, deadline - time.monotonic())  # type: ignore[assignment]
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=finish, name="drain", daemon=True).start()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 (its default),
    # letting any local client pick its rate-limit identity; create_app applies `trusted_proxies` instead.
    # access_log=False: RequestContext logs every request once, with its id, and without the secret part
    # of `/v1/images/{id}` paths, which uvicorn's access log would print.
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        proxy_headers=False,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
    )


def warn_if_open(settings: Settings) -> None:
    """Loud, because serving without keys beyond loopback is allowed only on purpose (Settings refuses it)."""
    if settings.open_to_network:
        log.warning(
            "!!! NO API KEYS on %s: anyone who can reach port %d may generate images "
            "(allow_unauthenticated is set; give api_keys to require a key) !!!",
            settings.host,
            settings.port,
        )


def serve(settings: Settings) -> None:
    warn_if_open(settings)
    if settings.retain_host_memory:  # before any worker thread starts (model/host_memory.py)
        retain_freed_memory()
    models = build_models(settings)
    app = create_app(settings, models)
    config = uvicorn_config(app, settings)
    log.info("serving %s on http://%s:%d", ", ".join(models.names), settings.host, settings.port)
    DrainingServer(config, models, settings.drain_timeout_s).run()
