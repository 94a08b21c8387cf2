"""What a ``medlens serve`` instance is configured with, and the start-up checks (secure by default)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, Field

from medlens.errors import MedlensError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class ServeSettingsError(MedlensError):
    """The server cannot start with these settings (a non-loopback host without an API key ...)."""


def default_data_dir() -> Path:
    """``$MEDLENS_CACHE/serve``, else ``~/.cache/medlens/serve``."""
    cache = os.environ.get("MEDLENS_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "medlens") / "serve"


class ServeSettings(BaseModel):
    """Model, address, key and every cap the server enforces (sizes in MB, times in seconds)."""

    model: str = "test-tiny"
    engine: str = "transformers"
    engine_options: dict = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    api_key: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    max_body_mb: float = Field(512, gt=0)
    max_files: int = Field(2000, ge=1)
    max_zip_ratio: float = Field(100, gt=1)
    max_unzipped_mb: float = Field(4096, gt=0)
    max_images: int = Field(200, ge=1)
    #: decoded pixels per input (the readers' budget, checked from headers before decoding)
    max_decoded_mb: float = Field(4096, gt=0)
    max_new_tokens: int = Field(4096, ge=1)
    max_queue: int = Field(32, ge=1)
    timeout_s: float = Field(300, gt=0)
    batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(20, ge=0)
    #: form fields other than files (question, options JSON ...) are at most this large, each
    max_field_kb: int = Field(256, ge=1)

    @property
    def adapter(self) -> str | None:
        """The PEFT adapter folder put on the model (``--adapter``: the engine's ``adapter`` option)."""
        value = self.engine_options.get("adapter")
        return str(value) if value is not None else None

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * 2**20)

    @property
    def max_unzipped_bytes(self) -> int:
        return int(self.max_unzipped_mb * 2**20)

    @property
    def tmp_dir(self) -> Path:
        """Where uploads land, one private folder per request."""
        return self.data_dir / "tmp"

    @property
    def jobs_db(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_settings(settings: ServeSettings) -> None:
    """Refuse what is unsafe: a non-loopback address without an API key; an empty key."""
    if settings.api_key is not None and not settings.api_key.strip():
        raise ServeSettingsError("the API key is empty")
    if settings.api_key is None and not is_loopback(settings.host):
        raise ServeSettingsError(
            f"refusing to listen on {settings.host} without an API key: give --api-key-file or set "
            "MEDLENS_API_KEY (without a key medlens serve binds loopback only)"
        )
