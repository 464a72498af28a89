"""The service's shared state (settings, models, batcher, metrics), reached by routes through FastAPI dependencies."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from torch import Tensor

from api.batching import BatchStats, Key, MicroBatcher
from api.errors import Busy
from api.metrics import Metrics
from api.models import Registry, ServedModel
from api.settings import Settings


@dataclass
class Service:
    """Everything a request handler needs; one per app, created by create_app."""

    settings: Settings
    registry: Registry
    metrics: Metrics
    batcher: MicroBatcher | None = None
    decoder: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the batcher and decoder pool on the running event loop (app startup)."""
        stats = BatchStats(on_batch=self.metrics.batch_size.observe, on_queue=self.metrics.queue_depth.set)
        self.batcher = MicroBatcher(self._run, max_batch=self.settings.max_batch,
                                    max_wait_ms=self.settings.max_wait_ms, queue_size=self.settings.queue_size,
                                    stats=stats)
        self.batcher.start()
        self.decoder = ThreadPoolExecutor(max_workers=self.settings.decode_threads, thread_name_prefix="zoo-decode")

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.decoder is not None:
            self.decoder.shutdown(wait=False, cancel_futures=True)

    def _run(self, key: Key, images: Tensor) -> Any:
        """One batched predictor call (on the inference thread)."""
        name, samples = key
        start = time.perf_counter()
        try:
            return self.registry.models[name].predictor(samples)(images)
        finally:
            self.metrics.inference.observe(time.perf_counter() - start)

    def require_ready(self) -> None:
        """503 with the reason until loading has finished (and for good if it failed)."""
        if self.registry.error is not None:
            raise Busy(f"loading the models failed: {self.registry.error}", retry_after=60)
        if not self.registry.ready:
            raise Busy("models are still loading; retry when GET /health/ready answers 200", retry_after=5)

    def model(self, name: str) -> ServedModel:
        """A served model by name: 503 while loading, 404 when unknown."""
        self.require_ready()
        return self.registry.get(name)

    async def predict(self, name: str, samples: int | None, images: Tensor) -> Any:
        assert self.batcher is not None, "the service has not started"
        return await self.batcher.submit((name, samples), images)

    async def in_decoder(self, fn: Any, *args: Any) -> Any:
        """Run a decoding step on the bounded decoder pool (at most decode_threads images in memory at once)."""
        assert self.decoder is not None, "the service has not started"
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)


def get_service(request: Request) -> Service:
    """FastAPI dependency: the app's Service."""
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
"""Route parameter type that injects the app's Service."""
