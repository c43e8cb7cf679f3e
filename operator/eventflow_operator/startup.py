"""What the operator opens at start and closes at exit: kopf's settings, Redis, the status writer."""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from redis.asyncio import Redis

from eventflow.keys import Keys
from eventflow.redis.client import connect, functions_for, keys_for
from eventflow.redis.functions import Functions
from eventflow.settings import EventflowSettings

GROUP = "eventflow.io"
VERSION = "v1alpha1"
FINALIZER = "eventflow.io/finalizer"

log = logging.getLogger(__name__)


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Set kopf's persistence and posting explicitly instead of relying on its defaults."""
    settings.persistence.finalizer = FINALIZER
    # Progress and diff-base live in our own annotations, so they survive kopf upgrades and are
    # namespaced apart from any other operator touching the same objects.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING


class StatusWriter:
    """Merge-patches ``.status`` of our objects from long-running code (daemons, a replay in progress).

    kopf applies a handler's ``patch`` only when the handler returns, so a daemon that never returns
    and a replay that reports progress need their own writer. It uses the same credentials kopf logs
    in with (in-cluster service account, else the kubeconfig).
    """

    #: (connect, read) timeout of one patch, seconds: a hung API server must not hang a daemon for good.
    REQUEST_TIMEOUT_S = (5, 30)

    def __init__(self, api_client: Any) -> None:
        self._client = api_client
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        # Our own threads for the synchronous client, joined on close: none outlives the operator.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="status-writer")

    @classmethod
    def from_environment(cls) -> StatusWriter:
        """In-cluster config when running in a pod, else ``$KUBECONFIG``/``~/.kube/config``."""
        config = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=config)
        return cls(kubernetes.client.ApiClient(config))

    async def patch(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge ``status`` into the object's status; False if the object is gone (deleted meanwhile)."""
        call = functools.partial(self._api.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, plural,
                                 name, {"status": status}, _request_timeout=self.REQUEST_TIMEOUT_S)
        try:
            # The client is synchronous: keep the operator's event loop free while it waits.
            await asyncio.get_running_loop().run_in_executor(self._pool, call)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def close(self) -> None:
        """Wait for patches in flight, then release the client's connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


@dataclass(slots=True)
class OperatorContext:
    """Everything the handlers share; kept in kopf's ``memo`` (no module globals)."""

    settings: EventflowSettings
    redis: Redis
    keys: Keys
    functions: Functions
    status: StatusWriter


def open_context(settings: EventflowSettings) -> OperatorContext:
    """Connect to Redis (lazily: the first command connects) and build the status writer."""
    redis = connect(settings)
    return OperatorContext(settings=settings, redis=redis, keys=keys_for(settings),
                           functions=functions_for(redis, settings), status=StatusWriter.from_environment())


async def close_context(context: OperatorContext) -> None:
    """Close what :func:`open_context` opened."""
    await asyncio.to_thread(context.status.close)  # joins its threads: off the event loop
    await context.redis.aclose()
