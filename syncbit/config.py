"""Configuration models (pydantic, extra='forbid') and YAML loading.

Every CLI flag is also a config key of the same name with `-` spelled `_`. This module
only validates; it starts nothing. Errors name the offending key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from syncbit.chunks import DEFAULT_CHUNK_SIZE
from syncbit.errors import ConfigError, InvalidSourceError
from syncbit.protocol import LOOKUP_RATE, MAX_LOOKUP_INTERVAL

if TYPE_CHECKING:
    from syncbit.mirror.config import MirrorConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(value: Any) -> int:
    """'200GiB', '1.5TB', '4096' -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 200GiB, 500MB, 1048576)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_address(value: Any) -> str:
    """'host:port' with a numeric port."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not a host:port address: {value!r}")
    return str(value)


M = TypeVar("M", bound=BaseModel)
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[str, BeforeValidator(parse_address)]


def check_source_options(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every prefix names a scheme and every option is one that scheme takes (unknown keys
    and bad values fail at start-up, not at the first read)."""
    from syncbit.sources.options import SCHEMES, scheme_of, validate_options

    for prefix, options in value.items():
        if scheme_of(prefix) not in SCHEMES:
            raise ValueError(
                f"{prefix!r} is not a URI prefix of a known scheme (e.g. 's3://bucket/', "
                f"'hf://', 'https://host/'; schemes: {', '.join(sorted(SCHEMES))})"
            )
        try:
            validate_options(prefix, options)
        except InvalidSourceError as exc:
            raise ValueError(f"{prefix!r}: {exc}") from None
    return value


# URI prefix -> options for sources under it, e.g. {"s3://models/": {"endpoint_url": ...}};
# the longest matching prefix applies, and a dataset's own options override it. This is
# where the secrets of sources live (HTTP `headers`, a Hub `token`): never in a manifest.
SourceOptions = Annotated[dict[str, dict[str, Any]], AfterValidator(check_source_options)]
FileRoots = list[Path] | None
_FILE_ROOTS_DOC = (
    "directories file:// datasets may name (real paths); none: /var/lib/syncbit/datasets "
    "when the scheduler listens on loopback only, else no file:// datasets"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerConfig(_Strict):
    """`syncbit scheduler` settings."""

    listen: Address = "127.0.0.1:7900"
    state_dir: Path = Path("/var/lib/syncbit/scheduler")
    node_timeout: float = Field(10.0, gt=0, description="seconds without heartbeat -> down")
    chunk_size: Size = DEFAULT_CHUNK_SIZE
    source_options: SourceOptions = Field(default_factory=dict)
    file_roots: FileRoots = Field(None, description=_FILE_ROOTS_DOC)
    token_file: Path | None = Field(
        None, description="the cluster secret; none: open (loopback only, unless insecure)"
    )
    insecure: bool = Field(False, description="serve beyond loopback without a token_file")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    peers_per_chunk: int = Field(
        default=8, ge=1, le=64, description="most peers any answer names for one chunk (K)"
    )
    heartbeat_rate: float = Field(
        default=500.0,
        gt=0,
        allow_inf_nan=False,
        description="heartbeats a second all nodes together are asked to keep to: the "
        "interval nodes are told stretches to nodes/rate (at most 30 s); node_timeout follows",
    )
    lookup_rate: float = Field(
        default=LOOKUP_RATE,
        gt=0,
        allow_inf_nan=False,
        description="chunk-map lookups a second all nodes' parked prefetches together are "
        "asked to keep to: each node is told nodes/rate seconds between its lookups (at "
        f"most {MAX_LOOKUP_INTERVAL:g} s; a read that waits on a peer still looks every 0.1 s)",
    )
    wake_rate: float = Field(
        default=250.0,
        gt=0,
        allow_inf_nan=False,
        description="generation long polls answered a second at most after a change: a "
        "dataset added or assigned wakes every node, whose syncs are spread over "
        "nodes/rate seconds instead of arriving at once",
    )
    state: str | None = Field(
        default=None,
        description="etcd://h1:2379,h2:2379,...: durable state in etcd, shared by replicas "
        "that elect one leader; none: LMDB in state_dir (one scheduler)",
    )
    etcd_prefix: str = Field(default="/syncbit/", description="key prefix of this cluster in etcd")
    advertise: str | None = Field(
        default=None, description="URL the other replicas reach this one at; default from listen"
    )
    election_ttl: int = Field(default=5, ge=1, le=60, description="seconds a dead leader leads on")
    tls_ca: Path | None = Field(default=None, description="CA of the other replicas' certificates")
    log_level: str = "info"


class DaemonConfig(_Strict):
    """`syncbit daemon` settings."""

    node: str = Field(default_factory=lambda: __import__("socket").gethostname())
    scheduler: str | None = Field(
        None, description="URL, or replicas' URL1,URL2,...; none runs the scheduler embedded"
    )
    scheduler_listen: Address = Field("127.0.0.1:7900", description="embedded scheduler")
    scheduler_state_dir: Path | None = None
    listen: Address = "127.0.0.1:7901"
    advertise: str | None = Field(None, description="address peers dial; default listen")
    cache_dir: Path = Path("/var/lib/syncbit/cache")
    cache_size: Size = 200 * 2**30
    mount: Path = Path("/syncbit")
    labels: dict[str, str] = Field(default_factory=dict)
    read_deadline: float = Field(60.0, gt=0, description="seconds before a read fails EIO")
    readahead_chunks: int = Field(8, ge=0)
    fetch_workers: int = Field(12, ge=1, description="more than both prefetch lanes")
    prefetch_concurrency: int = Field(6, ge=1, description="prefetch chunk transfers at once")
    prefetch_bandwidth: Size = Field(0, ge=0, description="bytes/s for prefetch; 0: no cap")
    prefetch_on_open: bool = Field(
        True,
        description="an open() of a cold file of prefetch_on_open_min_size or more "
        "fetches it whole in the background (a dataset's prefetch_on_open option overrides)",
    )
    prefetch_on_open_min_size: Size = Field(64 * 2**20, ge=0)
    trace_max_runs: int = Field(
        4096, ge=1, le=4096, description="runs an access trace records at most"
    )
    trace_quiet: float = Field(
        10.0, gt=0, description="seconds without new reads before an access trace is offered"
    )
    source_concurrency: int = Field(
        64, ge=1, description="source reads at once per source (host, bucket), at most"
    )
    upload_slots: int = Field(
        4, ge=0, description="prefetch transfers this node serves at once; 0: no limit"
    )
    heartbeat_interval: float = Field(2.0, gt=0)
    mount_readahead_kb: int = Field(1024, ge=0)
    passthrough: bool = Field(True, description="kernel reads fully cached files directly")
    node_timeout: float = Field(10.0, gt=0)
    source_options: SourceOptions = Field(default_factory=dict)
    file_roots: FileRoots = Field(None, description=_FILE_ROOTS_DOC)
    token_file: Path | None = Field(
        None, description="a bootstrap or node credential, or the cluster secret; none: open"
    )
    insecure: bool = Field(False, description="serve beyond loopback without a token_file")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(None, description="CA to verify the scheduler and peers")
    peer_tls_name: str | None = Field(
        None, description="name in every daemon's certificate; default: the address dialled"
    )
    peer_data_tls: bool = Field(
        True, description="chunk transfers over TLS too (with tls_cert); false: plain"
    )
    kubernetes: bool = Field(False, description="keep this Node's labels/taint in step")
    kubeconfig: Path | None = Field(None, description="none: in-cluster service account")
    kubernetes_interval: float = Field(5.0, gt=0)
    mirror: dict[str, Any] | None = Field(
        None,
        description="the node's registry mirror (keys of `python -m syncbit.mirror serve`'s "
        "config; listen defaults to 127.0.0.1:5050, cache_dir to <cache_dir>/mirror); "
        "absent: no mirror",
    )
    log_level: str = "info"

    @field_validator("mirror")
    @classmethod
    def _mirror(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Checked here (a bad key fails start-up), kept as given: `mirror_config` builds
        the model, whose module is imported only by nodes that mirror."""
        if value is not None:
            from syncbit.mirror.config import MirrorConfig

            try:
                MirrorConfig.model_validate(value)
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(p) for p in err["loc"]) or "(root)"
                raise ValueError(f"{key}: {err['msg']}") from None
        return value

    def mirror_config(self) -> MirrorConfig | None:
        """The registry mirror's settings, or None when this node runs none."""
        if self.mirror is None:
            return None
        from syncbit.mirror.config import MirrorConfig

        return MirrorConfig.model_validate(
            {"cache_dir": self.cache_dir / "mirror", "log_level": self.log_level, **self.mirror}
        )


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a ConfigError."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values")
    return data


def build(model: type[M], file: Path | None, flags: dict[str, Any]) -> M:
    """Config from YAML `file` (if any) overridden by non-None `flags`, validated."""
    data = load_yaml(file) if file else {}
    data.update({k: v for k, v in flags.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        where = f" in {file}" if file else ""
        raise ConfigError(f"invalid config key '{key}'{where}: {err['msg']}") from None
