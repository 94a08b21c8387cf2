"""Which DICOMweb servers medlens may contact and how: ``~/.config/medlens/dicomweb.toml``, or the file in
``MEDLENS_DICOMWEB_CONFIG`` (``--dicomweb-config FILE``).

```toml
[servers.pacs]
url = "https://pacs.example.org/dicom-web"
auth = "basic"               # none | basic | bearer
username = "medlens"
password_file = "/run/secrets/pacs"   # or password_env = "PACS_PASSWORD"
# token_file / token_env for bearer
ca_bundle = "/etc/ssl/hospital-ca.pem"
timeout = 30                 # seconds per request
parallel = 4                 # instances retrieved at once
cache_dir = "~/.cache/medlens/dicomweb"  # optional; default: a private temporary folder per study
cache_max_mb = 2048
```

Secrets are read from a file or an environment variable, never from the config itself, and never shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.errors import InputError

ENV = "MEDLENS_DICOMWEB_CONFIG"
DEFAULT_PATH = Path("~/.config/medlens/dicomweb.toml")
AUTH_KINDS = ("none", "basic", "bearer")


class DicomwebError(InputError):
    """A DICOMweb input cannot be read: bad reference or config, server down, refused or answering garbage."""

    #: raised while reading a slide's tiles, it fails the whole read, not one patch (io/slide_workers)
    fatal = True


class DicomwebConfigError(DicomwebError):
    """The DICOMweb configuration file is missing, unreadable or wrong."""


class UnknownServerError(DicomwebError):
    """The server name is not in the configuration (nothing is contacted)."""


class ServerUnavailableError(DicomwebError):
    """The server cannot be reached, timed out, or stopped answering."""


class ServerRefusedError(DicomwebError):
    """The server refused the request (authentication, permission, a redirect, not found)."""


class RemoteNotFoundError(DicomwebError):
    """The study or series is not on the server."""


class ServerResponseError(DicomwebError):
    """The server's answer is not what DICOMweb promises."""


@dataclass(frozen=True)
class Server:
    """One configured server; ``secret`` is the password or token (never printed: repr hides it)."""

    name: str
    url: str
    auth: str = "none"
    username: str | None = None
    secret: str | None = None
    ca_bundle: str | None = None
    timeout: float = 30.0
    parallel: int = 4
    cache_dir: str | None = None
    cache_max_mb: float = 2048.0

    def __repr__(self) -> str:
        return f"Server({self.name!r}, auth={self.auth!r})"


def config_path() -> Path:
    """The configuration in use: ``$MEDLENS_DICOMWEB_CONFIG`` or ``~/.config/medlens/dicomweb.toml``."""
    return Path(os.environ.get(ENV) or DEFAULT_PATH).expanduser()


def load_servers(path: Path | None = None) -> dict[str, Server]:
    """Every configured server by name; a missing default file means no servers."""
    import tomllib

    path = path or config_path()
    if not path.is_file():
        if path == DEFAULT_PATH.expanduser() and not os.environ.get(ENV):
            return {}
        raise DicomwebConfigError("DICOMweb config not found", str(path))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DicomwebConfigError(f"cannot read DICOMweb config ({exc})", str(path)) from None
    servers = data.get("servers", {})
    if not isinstance(servers, dict):
        raise DicomwebConfigError("[servers] must be a table of servers by name", str(path))
    return {name: _server(name, entry, path) for name, entry in servers.items()}


def get_server(name: str, path: Path | None = None) -> Server:
    """The configured server ``name``; :class:`UnknownServerError` (no connection attempt) otherwise."""
    servers = load_servers(path)
    if name not in servers:
        known = ", ".join(sorted(servers)) or "none"
        raise UnknownServerError(
            f"DICOMweb server {name!r} is not configured (configured: {known}; see {config_path()})",
            f"dicomweb://{name}",
        )
    return servers[name]


def _server(name: str, entry: Any, path: Path) -> Server:
    where = f"{path} [servers.{name}]"
    if not isinstance(entry, dict):
        raise DicomwebConfigError("a server must be a table", where)
    url = str(entry.get("url", ""))
    if not url.startswith(("http://", "https://")):
        raise DicomwebConfigError("url must start with http:// or https://", where)
    if "@" in url.split("/")[2]:
        raise DicomwebConfigError("put credentials in password_file/password_env, not in the url", where)
    auth = str(entry.get("auth", "none")).lower()
    if auth not in AUTH_KINDS:
        raise DicomwebConfigError(f"auth must be one of {', '.join(AUTH_KINDS)}, not {auth!r}", where)
    if "password" in entry or "token" in entry:
        raise DicomwebConfigError("no secrets inline: use password_file/password_env or token_file/token_env", where)
    secret = None
    if auth != "none":
        secret = _secret(entry, "password" if auth == "basic" else "token", where)
    if auth == "basic" and not entry.get("username"):
        raise DicomwebConfigError("auth basic needs username", where)
    ca = entry.get("ca_bundle")
    if ca is not None and not Path(str(ca)).expanduser().is_file():
        raise DicomwebConfigError("ca_bundle file not found", where)
    try:
        return Server(
            name=name,
            url=url.rstrip("/"),
            auth=auth,
            username=str(entry["username"]) if entry.get("username") else None,
            secret=secret,
            ca_bundle=str(Path(str(ca)).expanduser()) if ca else None,
            timeout=float(entry.get("timeout", 30)),
            parallel=max(1, int(entry.get("parallel", 4))),
            cache_dir=str(Path(str(entry["cache_dir"])).expanduser()) if entry.get("cache_dir") else None,
            cache_max_mb=float(entry.get("cache_max_mb", 2048)),
        )
    except (TypeError, ValueError) as exc:
        raise DicomwebConfigError(f"bad value ({exc})", where) from None


def _secret(entry: dict, kind: str, where: str) -> str:
    file, env = entry.get(f"{kind}_file"), entry.get(f"{kind}_env")
    if file:
        try:
            value = Path(str(file)).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise DicomwebConfigError(f"cannot read {kind}_file ({exc.strerror or exc})", where) from None
    elif env:
        value = os.environ.get(str(env), "")
        if not value:
            raise DicomwebConfigError(f"environment variable {env} ({kind}_env) is not set", where)
    else:
        raise DicomwebConfigError(f"{kind}_file or {kind}_env is needed", where)
    return value
