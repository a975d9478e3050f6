"""Server configuration: environment variables with the prefix PIXELCNN_, overridden by CLI flags.

Example: PIXELCNN_MODEL_STORE=/models PIXELCNN_API_KEY=secret pixelcnn serve --port 9000
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .connections import ConnectionLimits
from .model_store import default_model_store
from .tenants import Tenant, parse_tenants

DEFAULT_MODEL = "fashion-mnist"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIXELCNN_", extra="ignore", protected_namespaces=())

    model_store: Path = Field(
        default_factory=default_model_store,
        description="folder of model folders (config.json + model.safetensors); unset: ./model_store if it "
        "exists, else the one shipped beside the package",
    )
    model: str | None = Field(
        None, description=f"default model; unset: {DEFAULT_MODEL!r} if in the store, else the first alphabetically"
    )
    preload: Literal["all", "default"] = Field("all", description="load every model in the store, or only the default")
    host: str = "127.0.0.1"  # loopback unless asked: containers set PIXELCNN_HOST=0.0.0.0
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(
        1,
        ge=1,
        description="torch CPU threads per decode lane (and per /likelihood pass; a request's passes run "
        "side by side, one per lane). Default 1: a decode "
        "step is a few small matrix products per pixel, and OpenMP threads competing with the event loop "
        "for the cores made 16 concurrent /sample requests 2x slower on 2 cores (measured); cores are "
        "better used by more lanes. Raise it for large /likelihood batches on many-core CPUs",
    )
    scoring_nice: int = Field(
        10,  # app.engine.scoring.SCORING_NICE (not imported: settings load without torch)
        ge=0,
        le=19,
        description="how many nice steps below the decode lanes the /likelihood passes run (Linux, per "
        "thread): a decode lane that wants a core gets it first, so /sample beside a long /likelihood keeps "
        "most of its speed (measured 20 -> 14.5 ms per image on 2 cores), while /likelihood alone still uses "
        "every core. 0: the same priority",
    )
    lanes: int | None = Field(
        None,
        ge=1,
        le=64,
        description="decode lanes (threads, each with its own batch) per model. Unset: "
        "1 on a GPU; on a CPU one per `threads` usable CPUs (affinity, cgroup quota), at most 8",
    )
    max_batch_images: int = Field(
        64, ge=1, description="images one lane holds at a time, and the most one request may ask for"
    )
    step_images: int | None = Field(
        None,
        ge=1,
        description="the most images one decode step draws a row of; a lane's other images take turns, "
        "so a higher-priority request waits for one such step at most. Unset: 16 on a CPU (where a row "
        "costs the same per image from 16 up), max_batch_images on a GPU. Half as many while work of "
        "different priorities shares the engine",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a generation running longer is stopped: a 504 `timeout`, or an `error` event "
        "in a stream; a stream whose client stopped reading is cut this long (plus 5 s) after it started",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, how long running requests may take to finish before the rest "
        "end with an error event naming the shutdown (keep below the orchestrator's grace period)",
    )
    shutdown_notice_s: float = Field(
        1.0,
        ge=0,
        description="on SIGTERM, how long /ready answers 503 before the drain starts counting, so "
        "a gateway's health check sees it (part of shutdown_timeout_s)",
    )
    batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=100,
        description="an idle lane that gets work waits until no request has arrived for "
        "this long (at most 5x in all), so that requests sent together start together; 0: start at once",
    )
    max_queue: int = Field(
        64,
        ge=0,
        description="generation requests waiting for a batch slot, and likelihood requests running, before 503",
    )
    max_images_per_request: int = Field(64, ge=1)
    max_likelihood_passes: int = Field(
        44,
        ge=1,
        description="cost cap of one /likelihood request in forward passes of up to 16 images: one per "
        "16 images, times (classes + 1) for a conditional model scored without a label. Default 44: "
        "64 unlabelled images on a 10-class model",
    )
    max_upload_bytes: int = Field(2 * 1024 * 1024, ge=1, description="request bodies above this get 413")
    fault_every_steps: int = Field(
        0, ge=0, description="soak and tests only: every Nth decode step fails (an injected fault); 0: never"
    )
    fault_leak_bytes_per_request: int = Field(
        0,
        ge=0,
        description="soak and tests only: every request leaves this many bytes behind for good (a planted "
        "leak that `pixelcnn bench soak` must flag); 0: never",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="request line plus headers above this get 431 and the connection closed"
    )
    max_header_count: int = Field(100, ge=1, description="requests with more headers get 431")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request head not complete this long after its first byte gets 408"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not complete this long after its head gets 408"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="a connection with no request in progress is closed after this long idle"
    )
    api_key: SecretStr | None = Field(None, description="bearer token required on POST routes; unset: no auth")
    api_keys: SecretStr | None = Field(
        None,
        description="tenants and their bearer keys, 'name:key[:priority[:max_in_progress]],...' (see "
        "app/server/tenants.py); with PIXELCNN_API_KEY too, that key is tenant 'default'",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed browser origins, comma-separated in the environment; empty: CORS off"
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        """Accept "a,b" from the environment as well as a list."""
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _valid_tenants(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_tenants(value.get_secret_value())  # ValueError names the bad entry
        return value

    def tenants(self) -> list[Tenant]:
        """Every API key as a tenant: PIXELCNN_API_KEYS, and PIXELCNN_API_KEY as 'default'."""
        tenants = parse_tenants(self.api_keys.get_secret_value()) if self.api_keys is not None else []
        if self.api_key is not None:
            tenants.append(Tenant("default", self.api_key.get_secret_value()))
        return tenants

    @field_validator("api_key", "api_keys", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        """PIXELCNN_API_KEY= (empty) means no key, not a key that is the empty string."""
        return None if value == "" else value

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            max_header_bytes=self.max_header_bytes,
            max_header_count=self.max_header_count,
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            keep_alive_timeout_s=self.keep_alive_timeout_s,
        )

    def lanes_for(self, device_type: str) -> int:
        """The decode lanes to run on a device of this type ("cpu" or "cuda")."""
        if self.lanes is not None:
            return self.lanes
        if device_type != "cpu":
            return 1  # one GPU runs one big batch best; lanes would only take turns on it
        return max(1, min(8, usable_cpus() // self.threads))


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's --cpus, a
    Kubernetes limit) when there is one, rounded up. Reads cgroup v2 (cpu.max) and v1 (cpu.cfs_*_us)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def cgroup_cpu_quota(cgroup: Path) -> float | None:
    """The CPU quota in CPUs, or None when there is none (or no cgroup file to say so)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "250000 100000"
    except (OSError, ValueError):
        try:  # v1: a quota of -1 means none
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
