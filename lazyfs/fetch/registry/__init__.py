"""The OCI distribution API over httpx (on trio): manifests, blobs, ranged reads, uploads, auth.

``RegistryClient`` talks to any number of registries through one pooled httpx client.
The package is a sans-IO core with a thin trio shell:

=================  ==================================================================
``hosts``          which endpoints serve a registry (mirrors, origin), their TLS (pure)
``certsd``         containerd's ``certs.d/HOST/hosts.toml`` read as host configuration
``auth``           challenge -> token -> resend: ``AuthCore`` (pure) and its httpx.Auth flow
``picker``         source order, health, exclusions, per-source counters (pure)
``retry``          the one retry layer: tenacity with trio sleeps, one deadline
``transport``      per-host TLS and mTLS, HTTP(S) proxies, bounded bodies
``answers``        reading answers: bounded bodies, error mapping, headers
``client``         ``RegistryClient``: the shell that wires them together
``manifests``      manifests and tags; ``blobs``: blob reads; ``uploads``: blob uploads
``backend``        ``RegistryBackend``, the ``Backend`` the fetch scheduler reads through
=================  ==================================================================

Every public call raises only lazyfs errors: ``NotFoundError``, ``AuthError``,
``IntegrityError``, ``ConfigError``, ``FetchError`` (with ``.status`` when there was an
HTTP answer) — never httpx's. docs/registry.md states the retry and failover policy.
"""

from lazyfs.fetch.backend import SourcedBytes
from lazyfs.fetch.registry.backend import RegistryBackend
from lazyfs.fetch.registry.blobs import MAX_BLOB_IN_MEMORY, SMALL_WHOLE_BLOB
from lazyfs.fetch.registry.client import RegistryClient, RegistryStatistics
from lazyfs.fetch.registry.hosts import PULL, PUSH, RESOLVE, Endpoint, HostsEntry, HostTable, RegistryConfig, TlsProfile
from lazyfs.fetch.registry.picker import Health, HealthPolicy, SourceStatistics
from lazyfs.fetch.registry.retry import RetryPolicy
from lazyfs.fetch.registry.transport import ProxySettings
from lazyfs.fetch.registry.uploads import BlobPush

__all__ = [
    "BlobPush", "Endpoint", "Health", "HealthPolicy", "HostTable",
    "HostsEntry", "MAX_BLOB_IN_MEMORY",
    "PULL", "PUSH", "ProxySettings", "RESOLVE", "RegistryBackend", "RegistryClient", "RegistryConfig",
    "RegistryStatistics", "RetryPolicy", "SMALL_WHOLE_BLOB", "SourceStatistics", "SourcedBytes", "TlsProfile",
]
