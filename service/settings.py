"""Server settings: one ``BaseSettings`` class, read from ``OPTSERVE_*`` environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting, its environment variable (``OPTSERVE_`` + upper-case name) and its default."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
