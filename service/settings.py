"""Server settings: one ``BaseSettings`` class, read from ``OPTSERVE_*`` environment variables and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not a POSIX system
        return 8 << 30


class Settings(BaseSettings):
    """Every setting, its environment variable (``OPTSERVE_`` + upper-case name) and its default."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = Field(
        default=None, description="also listen on this Unix socket (clients: unix:///path), owner-only"
    )
    data_dir: Path = Path("data")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = "text"

    # where sessions live: this process (memory), or session hosts on a Ray cluster (ray)
    store: Literal["memory", "ray"] = "memory"
    ray_address: str | None = Field(default=None, description="a Ray cluster to join (unset: start a local one)")
    ray_namespace: str = Field(default="optserve", description="Ray namespace of this deployment's actors")
    shard_bytes: int = Field(
        default=0, ge=0, description="Ray store: shard sessions of more state bytes than this (0: on request)"
    )
    ray_direct: bool = Field(
        default=True, description="Ray store: steps go to their host over its own socket (false: as Ray actor calls)"
    )
    ray_direct_port: int = Field(
        default=0, ge=0, le=65535, description="Ray store: the hosts' port for steps (0: any free port)"
    )
    ray_recovery_seconds: float = Field(
        default=60.0, gt=0, description="how long a request waits for a session whose host is gone (then 503)"
    )

    # durability
    snapshot_every_steps: int = Field(
        default=100, ge=0, description="snapshot a session after this many steps (0: never)"
    )
    snapshot_every_seconds: float = Field(
        default=30.0, ge=0, description="snapshot changed sessions this often (0: never)"
    )
    fsync_every_step: bool = Field(default=False, description="snapshot before answering every step")
    graceful_shutdown_seconds: float = Field(default=5.0, gt=0, description="time for in-flight requests at shutdown")

    # auth
    api_key: SecretStr | None = Field(default=None, description="admin key; unset: auth off")

    # limits
    max_body_bytes: int = Field(default=4 << 30, gt=0)
    max_header_bytes: int = Field(default=16 << 20, gt=0, description="largest safetensors JSON header")
    max_json_body_bytes: int = Field(
        default=16 << 20, gt=0, description="largest JSON body (decoding costs up to ~12x its size in memory)"
    )
    max_request_head_bytes: int = Field(
        default=64 << 10, gt=0, description="largest HTTP request line plus headers (431 beyond)"
    )
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="time a client has to send a request's line and headers (408 after)"
    )
    max_tensors_per_session: int = Field(default=100_000, gt=0)
    max_params_per_session: int = Field(default=4 << 30, gt=0)
    max_sessions: int = Field(default=1000, gt=0)
    memory_budget_bytes: int = Field(
        default_factory=lambda: int(_physical_memory() * 0.75), gt=0, description="state of all sessions, in bytes"
    )
    session_ttl_seconds: float = Field(
        default=86400.0, ge=0, description="evict sessions idle this long from memory (snapshotted first; 0: never)"
    )
    session_expire_seconds: float = Field(
        default=7 * 86400.0, ge=0, description="delete sessions without a step or change this long (0: never)"
    )
