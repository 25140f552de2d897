"""Server settings: read once (environment `INFINITY_*` and CLI flags), checked, passed down.

Nothing else in the project reads environment variables.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import AttentionChoice, CompileMode, Precision, PreviewMode, VaeDecodeMode, default_precision
from model.schedules import PN_NAMES, PixelBudget
from server.batcher import BatchingMode
from server.models_file import ModelsFileError, ModelSpec, load_models_file


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFINITY_", extra="forbid", frozen=True)

    # --- weights (all three, or none for the embedded default model) ---
    transformer: Path | None = None
    vae: Path | None = None
    text_encoder: Path | None = None
    model_name: str = "infinity"  # id reported by /v1/models and accepted in requests
    # Several models in one server: a TOML file of `[[models]]` entries (server/models_file.py), in
    # place of the three paths above; each entry may set its own devices, dtype, batch size, limits.
    models_file: Path | None = None

    # --- devices ---
    devices: list[str] = Field(default_factory=lambda: ["cpu"])  # one replica per device
    dtype: Precision | None = None  # None: bfloat16 on CUDA, float32 on CPU
    # Cross-attention kernel. auto: exact sdpa on CPU (float32 runs give the official model's float32
    # math bit for bit); flash-attn on CUDA when installed, else sdpa-bf16io. What each mode matches and
    # does not: model.config.ATTENTION_MODES (logged at start-up).
    attention: AttentionChoice = "auto"
    compile: CompileMode = "off"  # torch.compile the blocks
    batch_invariant: bool = True  # a seed's image never depends on its batch (docs/serving.md)
    preview: PreviewMode = "auto"  # stream previews: model.config.PreviewMode (auto: trained decoder if shipped)
    vae_decode: VaeDecodeMode = "fast"  # "reference": the official decoder graph as written (~1.3x slower on CPU)
    # Keep freed host memory for reuse instead of returning it to the kernel (glibc malloc): large CPU
    # activations are then not page-faulted anew on every request (the CPU decode ~1.3-1.7x faster).
    # Resident memory stays at its peak. model/host_memory.py
    retain_host_memory: bool = True
    warmup: bool = True

    # --- batching and admission ---
    # "static": a batch runs all its scales before the queue is looked at again; "continuous": waiting
    # requests join at the next scale boundary (server/continuous.py). docs/serving.md#continuous-batching
    batching: BatchingMode = "static"
    max_batch_size: int = Field(8, ge=1, le=256)  # rows (images) per batch; continuous: rows in flight
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1)  # queued images before 429
    memory_budget_bytes: int | None = Field(None, ge=1)  # KV cache bytes per batch; None = no cap
    request_timeout_s: float = Field(600.0, gt=0)  # server-side deadline of a request
    worker_restarts: int = Field(3, ge=0)  # restarts of a dead worker per 10 minutes, then not-ready

    # --- limits ---
    default_pn: PixelBudget | None = None  # None: the model's own default
    max_pn: PixelBudget | None = None  # None: the model's own limit
    max_n: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)  # text-only requests
    # Requests that carry an input image (the edits and variations uploads, a /generate body with an
    # `image`): a 1024x1024 PNG is a few MB, and OpenAI takes up to 50 MB per image. Image and mask
    # together, as sent (base64 in JSON adds a third). A /generate body over `max_body_bytes` without
    # an `image` still gets 413 (docs/image-to-image.md, "Limits").
    max_image_body_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    # Input images: pixels allowed (width x height), read from the file's header before any decoding,
    # so a small file that claims a huge size (a decompression bomb) is refused for free. 4096x4096:
    # a 12 MP phone photo fits; decoded it holds at most 64 MiB (RGBA).
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    url_ttl_s: float = Field(600.0, gt=0)  # lifetime of `response_format=url` images
    url_store_max_bytes: int = Field(512 * 1024 * 1024, ge=1)

    # --- security ---
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty = no authentication
    allow_unauthenticated: bool = False  # no keys on a non-loopback host: refused unless this
    rate_limit: str | None = None  # per authenticated key, else client address: "30/minute"
    trusted_proxies: list[str] = Field(default_factory=list)  # IPs/CIDRs whose X-Forwarded-For is believed

    # --- http ---
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_requests_body: bool = False
    drain_timeout_s: float = Field(60.0, ge=0)
    stream_ping_s: float = Field(15.0, gt=0)  # `: ping` comment on streams (proxies cut idle ones at ~60 s)
    stream_send_timeout_s: float = Field(30.0, gt=0)  # a stream's client reading nothing this long: closed, cancelled

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, devices: list[str]) -> list[str]:
        import torch

        if not devices:
            raise ValueError("at least one device is needed")
        for d in devices:
            try:
                dev = torch.device(d)
            except RuntimeError:
                raise ValueError(f"unknown device {d!r} (use cpu, cuda, cuda:1, ...)") from None
            if dev.type == "cuda":
                index = dev.index or 0
                if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                    raise ValueError(f"device {d!r} is not available on this machine")
            elif dev.type != "cpu":
                raise ValueError(f"unsupported device {d!r} (use cpu or cuda)")
        return devices

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse

            if parse(value).amount < 1:  # parse: a ValueError names what is wrong
                raise ValueError(f"rate_limit must allow at least one request, got {value!r}")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, proxies: list[str]) -> list[str]:
        # Checked here because uvicorn's proxy middleware silently treats a malformed entry as a name.
        for entry in proxies:
            try:
                ipaddress.ip_network(entry)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {entry!r} is not an IP address or CIDR network (such as 10.0.0.7 or 10.0.0.0/8)"
                ) from None
        return proxies

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> Settings:
        given = {n: getattr(self, n) for n in ("transformer", "vae", "text_encoder")}
        if any(v is not None for v in given.values()):
            missing = [n for n, v in given.items() if v is None]
            if missing:
                raise ValueError(f"weights: give transformer, vae and text_encoder together (missing: {missing})")
            for name, path in given.items():
                if not Path(path).exists():
                    raise ValueError(f"{name}: {path} does not exist")
        if self.default_pn and self.max_pn and PN_NAMES.index(self.default_pn) > PN_NAMES.index(self.max_pn):
            raise ValueError(f"default_pn {self.default_pn} exceeds max_pn {self.max_pn}")
        if self.max_image_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_image_body_bytes {self.max_image_body_bytes} is below max_body_bytes {self.max_body_bytes}: "
                f"requests with an image would get less room than text-only ones"
            )
        if self.max_n > self.max_batch_size:
            raise ValueError(
                f"max_n {self.max_n} exceeds max_batch_size {self.max_batch_size}: "
                f"one request's images always share a batch"
            )
        if self.max_n > self.max_queue:
            raise ValueError(
                f"max_n {self.max_n} exceeds max_queue {self.max_queue}: such a request could never "
                f"be queued, and clients would retry its 429 forever"
            )
        return self

    @model_validator(mode="after")
    def _models_file_serves(self) -> Settings:
        """A models file is read at start-up: a bad entry, or one whose settings clash with the
        server's (max_n over its max_batch_size, say), stops the start with the entry's name."""
        if self.models_file is None:
            return self
        if self.weight_paths is not None:
            raise ValueError("give either models_file or transformer/vae/text_encoder, not both")
        try:
            specs = load_models_file(self.models_file)
        except ModelsFileError as e:
            raise ValueError(str(e)) from None
        for spec in specs:
            self.for_model(spec)
        return self

    def model_specs(self) -> tuple[ModelSpec, ...] | None:
        """The entries of `models_file`, in order; None without one (the one model of the flags)."""
        return None if self.models_file is None else load_models_file(self.models_file)

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings with the entry's own overrides, checked as a whole (ValueError naming the entry)."""
        values = {**self.model_dump(), "models_file": None, **spec.overrides()}  # None: no recursion
        try:
            return Settings(**values)
        except ValidationError as e:
            problems = "; ".join(_problem(err) for err in e.errors())
            raise ValueError(f"models file, model {spec.name!r}: {problems}") from None

    @model_validator(mode="after")
    def _no_open_network_by_accident(self) -> Settings:
        if self.open_to_network and not self.allow_unauthenticated:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and api_keys is empty: "
                f"set api_keys, or allow_unauthenticated=true (--allow-unauthenticated) "
                f"to serve anyone who can connect"
            )
        return self

    @property
    def open_to_network(self) -> bool:
        """True when the server listens beyond loopback without API keys: anyone reaching it may generate."""
        return not self.api_keys and not _is_loopback(self.host)

    @property
    def uses_default_model(self) -> bool:
        return self.transformer is None

    @property
    def weight_paths(self) -> tuple[Path, Path, Path] | None:
        """(transformer, vae, text_encoder), given together; None: the embedded default model."""
        if self.transformer is None or self.vae is None or self.text_encoder is None:
            return None
        return self.transformer, self.vae, self.text_encoder

    def dtype_for(self, device: str) -> Precision:
        return self.dtype or default_precision(device)


def _problem(error) -> str:
    """One pydantic error as "field: message" (the message alone for a check of the whole settings)."""
    message = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(map(str, error['loc']))}: {message}" if error["loc"] else message


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1; any other name or address (0.0.0.0 included) counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
