"""Where caches and runs live: a local folder or an object-store URI (s3://, gs://, az://, ...).

`location(p)` gives a `pathlib.Path` for a local path and a `RemotePath` for a URI; the
two share the few path operations the project uses (`/`, read/write text and bytes,
`exists`, `is_file`, `mkdir`, `name`, `parent`), so the code that writes a cache or a run
is the same for both. Lance, which lists and commits its own files, is given the URI;
everything else (meta.json, text_constants.safetensors, checkpoints, exported weights,
logs, samples) goes through fsspec, which Lightning uses too.

Credentials and the endpoint come from the environment, as every S3 client reads them
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION), or from the
config's `storage:` section, which `apply_storage` exports into this process's
environment at start-up. They are never part of a recorded config (`Config.to_dict`
leaves `storage` out, and `storage_env` passes only the endpoint and region on to other
nodes), so they reach no log, metadata file or checkpoint.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

# What the storage section sets, and the variables S3 clients read it from. AWS_ALLOW_HTTP
# is Lance's (object_store's) switch for a plain-http endpoint such as a local MinIO or moto.
ENV = {"endpoint": "AWS_ENDPOINT_URL", "region": "AWS_REGION", "access_key_id": "AWS_ACCESS_KEY_ID",
       "secret_access_key": "AWS_SECRET_ACCESS_KEY", "session_token": "AWS_SESSION_TOKEN"}
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PASSED_ON = (*ENV.values(), "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP", "AWS_PROFILE")


def is_uri(path) -> bool:
    return isinstance(path, RemotePath) or "://" in str(path)


def location(path) -> Path | RemotePath:
    """`path` as a Path (local) or a RemotePath (URI)."""
    if isinstance(path, (Path, RemotePath)):
        return path
    return RemotePath(str(path)) if is_uri(path) else Path(path)


def apply_storage(storage) -> None:
    """Export the config's `storage:` section into this process's environment.

    A value set in the section wins over the environment's. A plain-http endpoint also
    sets AWS_ALLOW_HTTP, which Lance needs to talk to it.
    """
    if storage is None:
        return
    for key, variable in ENV.items():
        value = getattr(storage, key, None)
        if value:
            os.environ[variable] = str(value)
    if storage.region:
        os.environ["AWS_DEFAULT_REGION"] = storage.region
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint.startswith("http://"):
        os.environ.setdefault("AWS_ALLOW_HTTP", "true")


def storage_env() -> dict[str, str]:
    """The storage settings of this environment, for processes that do not inherit it (Ray
    workers on other nodes): the endpoint and region, never the keys. A runtime
    environment is recorded by Ray (its dashboard, its logs), so the keys must reach other
    nodes from their own environment or an instance role."""
    return {k: os.environ[k] for k in PASSED_ON if k not in SECRETS and os.environ.get(k)}


class RemotePath:
    """A path inside an object store, with the part of pathlib's API this project uses."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.scheme, _, self._key = self.uri.partition("://")

    @property
    def fs(self):
        import fsspec

        return fsspec.filesystem(self.scheme)  # fsspec caches instances; credentials from the environment

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemotePath({self.uri!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part) -> RemotePath:
        return RemotePath(f"{self.uri}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return posixpath.basename(self._key)

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{posixpath.dirname(self._key)}")

    def exists(self) -> bool:
        return self.fs.exists(self._key)

    def is_file(self) -> bool:
        return self.fs.isfile(self._key)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: nothing to make (a bucket must exist)."""

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self._key)

    def write_bytes(self, data: bytes) -> int:
        self.fs.pipe_file(self._key, data)  # one PUT: readers see all of it or nothing
        return len(data)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))


def write_atomic(path, data: bytes) -> None:
    """Write a whole file so that no reader sees part of it: a staged rename locally, one
    PUT on an object store."""
    path = location(path)
    if isinstance(path, RemotePath):
        path.write_bytes(data)
        return
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_bytes(data)
    staging.replace(path)


def start_local_s3(timeout: float = 30.0):
    """(process, endpoint URL): moto's S3 server on a free loopback port, once it answers; for
    the tests and benchmarks that need an object store on this machine (`pip install
    'moto[server]'`). The caller kills the process."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.2)
