"""The node's open sources: one `Source` per source URI and options, opened inside this
node's fences and with this node's own credentials. Never takes a secret or an
operator-only option from a manifest (whatever the scheduler that sent it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from syncbit.config import DaemonConfig
from syncbit.manifest import Manifest
from syncbit.sources.base import Source, open_source, options_for
from syncbit.sources.fences import Fences, default_file_roots
from syncbit.sources.options import public_options, register_secrets


@dataclass
class SourceCache:
    """One open `Source` per source URI, shared by every file of every dataset version.

    Sources open inside this node's own fences (`file_roots`) and with this node's own
    credentials (`source_options` of its config, its environment): a manifest carries
    neither, whatever the scheduler that sent it.
    """

    configured: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    fences: Fences = field(default_factory=Fences)

    def __post_init__(self) -> None:
        for prefix, options in self.configured.items():
            register_secrets(prefix, options)  # masked in every log line of this process

    def __call__(self, manifest: Manifest) -> Source:
        key = manifest.source + json.dumps(manifest.source_options, sort_keys=True)
        source = self.sources.get(key)
        if source is None:
            # What a manifest may not decide for this node (secrets, operator-only
            # options) comes from this node's config alone.
            given = public_options(manifest.source, manifest.source_options)
            options = options_for(manifest.source, self.configured, given)
            source = open_source(manifest.source, options, self.fences)
            self.sources[key] = source
        return source

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources.clear()


def daemon_file_roots(config: DaemonConfig) -> tuple[Path, ...]:
    """The directories this node reads `file://` datasets from: the configured ones, else
    the default for where its scheduler listens (embedded, or the one it talks to)."""
    if config.file_roots is not None:
        return tuple(config.file_roots)
    if config.scheduler is None:
        return default_file_roots(config.scheduler_listen.rpartition(":")[0].strip("[]"))
    first = config.scheduler.split(",")[0].strip()  # replicas: URL1,URL2,... (one host)
    url = first if "://" in first else f"http://{first}"
    return default_file_roots(urlsplit(url).hostname)
