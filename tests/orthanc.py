"""A real Orthanc PACS for the tests: Debian's ``/usr/sbin/Orthanc`` with its DICOMweb plugin, started on a
free loopback port with a generated configuration (temporary storage, no remote access, HTTP authentication
with a generated user). Tests that use it skip with the reason when Orthanc or the plugin is missing.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
STARTUP_S = 30.0


def dicomweb_plugin() -> str | None:
    """Where Debian's orthanc-dicomweb package put the plugin, or None."""
    for folder in PLUGIN_DIRS:
        for found in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return str(found)
    return None


def missing() -> str | None:
    """Why Orthanc cannot run here, or None."""
    if not (Path(ORTHANC).is_file() or shutil.which("Orthanc")):
        return f"Orthanc not installed ({ORTHANC} missing; apt-get install orthanc)"
    if dicomweb_plugin() is None:
        return "Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """One running Orthanc: its base URLs, the generated user and how to stop it."""

    folder: Path
    port: int = field(default_factory=free_port)
    user: str = "medlens"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log(self) -> Path:
        return self.folder / "orthanc.log"

    def start(self) -> Orthanc:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medlens-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpThreadsCount": 16,
            "StorageCompression": False,
            "SaveJobs": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        os.chmod(path, 0o600)
        exe = ORTHANC if Path(ORTHANC).is_file() else shutil.which("Orthanc")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [str(exe), f"--logdir={self.folder}", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def _auth(self) -> str:
        return "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()

    def get(self, route: str) -> object:
        req = urllib.request.Request(self.url + route, headers={"Authorization": self._auth()})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.loads(answer.read())

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API (POST /instances)."""
        for f in files:
            req = urllib.request.Request(
                self.url + "/instances",
                data=f.read_bytes(),
                headers={"Authorization": self._auth(), "Content-Type": "application/dicom"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=30) as answer:
                answer.read()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def config_toml(self, name: str = "orthanc", password_file: Path | None = None, **extra: object) -> str:
        """A medlens DICOMweb config naming this server (the password in a 0600 file)."""
        pw = password_file or self.folder / f"{name}.password"
        pw.write_text(self.password + "\n")
        os.chmod(pw, 0o600)
        lines = [
            f"[servers.{name}]",
            f'url = "{self.dicomweb}"',
            'auth = "basic"',
            f'username = "{self.user}"',
            f'password_file = "{pw}"',
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A running Orthanc for the module (skips with the reason when not installed)."""
    why = missing()
    if why:
        pytest.skip(why)
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def config(orthanc: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dicomweb.toml naming the running Orthanc ``orthanc``, set as medlens's config for the test."""
    from medlens.io.dicomweb_config import ENV

    path = tmp_path / "dicomweb.toml"
    path.write_text(orthanc.config_toml("orthanc"))
    monkeypatch.setenv(ENV, str(path))
    return path
