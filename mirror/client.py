"""Mirror clients: ``AsyncMirrorClient`` for asyncio services, ``MirrorClient`` for threaded ones.

Both share the caller-side ``MirrorCore`` (``publish`` never blocks or raises in lenient mode)
and the ``KafkaSender``; they differ only in where the sender's event loop runs: the caller's
loop, or a private daemon thread.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import threading
import weakref
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from mirror.config import MirrorConfig, MirrorSettingError, normalize_settings
from mirror.core import MirrorCore
from mirror.metrics import MirrorStats, register_client
from mirror.sender import KafkaSender, drain_and_stop


class _MirrorClientBase:
    def __init__(self, config: MirrorConfig | None = None, **settings: Any) -> None:
        """``config`` or keyword settings (``MirrorConfig``'s fields: ``bootstrap``, ``topic``, ...;
        ``bootstrap_servers`` is an alias of ``bootstrap``); keywords given with a config replace its
        values. An unknown keyword raises ``MirrorSettingError`` (a ``MirrorError`` and a ``TypeError``)
        naming the settings."""
        settings = normalize_settings(settings, type(self).__name__)
        if config is not None and not isinstance(config, MirrorConfig):
            raise MirrorSettingError("config", f"{type(config).__name__} {config!r} is not a MirrorConfig",
                                     "pass MirrorConfig(...) or keyword settings, e.g. bootstrap='host:9092'")
        if config is None:
            config = MirrorConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        self.config = config
        self._core = MirrorCore(config)
        self.metrics_registry = config.registry if config.registry is not None else CollectorRegistry()
        self.metrics_label = register_client(self.metrics_registry, config.client_id, self, self._core.stats)
        # The bound method of the core, not a wrapper: one call layer less on the hot path.
        self.publish = self._core.publish  # type: ignore[method-assign]

    def publish(
        self,
        request_id: str,
        model: str,
        version: str,
        inputs: Mapping[str, Any] | Any,
        outputs: Mapping[str, Any] | Any,
        latency_ms: float,
        attributes: Mapping[str, str] | None = None,
        *,
        sample_key: str | None = None,
        label: int | float | None = None,
        sent_at: datetime | float | None = None,
    ) -> bool:
        """Mirror one production request; returns at once, never blocks on Kafka.

        inputs / outputs: name -> numpy array or (nested) list; a bare array is named
            "input" / "output". Arrays are encoded later on the sender (see copy_arrays).
        latency_ms: the production model's measured latency.
        attributes: slice keys (values are str()-ed), e.g. {"country": "de"}.
        sample_key: what makes requests dependent (a user, a session, a device id; str()-ed, up to
            256 characters; None or "": none). Written into the record's ``sample_key`` field: the
            judge treats one key's requests within ``cluster_gap_s`` as one cluster. Also what
            sampling and the Kafka key use instead of request_id, so one user is always in or
            always out and stays in order on one partition (the worker never reads the Kafka key).
        label: ground truth, when known. sent_at: when production answered (default: now).

        Returns True if the record was buffered; False if sampled out, dropped (buffer full,
        client closed) or invalid. Invalid calls raise ``MirrorError`` only in strict mode.
        """
        return self._core.publish(request_id, model, version, inputs, outputs, latency_ms, attributes,
                                  sample_key=sample_key, label=label, sent_at=sent_at)

    def stats(self) -> MirrorStats:
        """Counters now: published, sampled_out, dropped, failed (by reason), buffer_depth, ..."""
        return self._core.stats()

    def set_sample_rate(self, model: str, rate: float) -> None:
        """Change a model's sampling rate while running (0.0 to 1.0)."""
        self._core.sampler.set_rate(model, rate)

    def prometheus_text(self) -> bytes:
        """The metrics registry in Prometheus text format (for a /metrics handler)."""
        return generate_latest(self.metrics_registry)


class AsyncMirrorClient(_MirrorClientBase):
    """Mirror client for asyncio services; the sender runs as a task on the caller's loop.

        async with AsyncMirrorClient() as mirror:  # bootstrap: KAFKA_BOOTSTRAP or 127.0.0.1:19092
            mirror.publish(request_id, "digits", "v3", {"x": x}, {"probs": p}, latency_ms)

    ``start()`` returns at once even when Kafka is down; the sender connects in the background.
    ``publish`` may also be called from other threads.
    """

    def __init__(self, config: MirrorConfig | None = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._sender: KafkaSender | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> AsyncMirrorClient:
        if self._task is not None:
            return self
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        sender = self._sender = KafkaSender(self._core)

        def wake() -> None:
            if threading.get_ident() == loop_thread:
                sender.wake()
            else:
                loop.call_soon_threadsafe(sender.wake)

        self._core.wake = wake
        self._task = loop.create_task(sender.run(), name="shadowlens-mirror-sender")
        return self

    async def close(self, timeout: float | None = None) -> MirrorStats:
        """Deliver what is buffered within ``timeout`` seconds (config.close_timeout_s), then stop."""
        timeout = self.config.close_timeout_s if timeout is None else timeout
        if self._sender is None:  # never started: nothing can be delivered
            self._sender = KafkaSender(self._core)
        await drain_and_stop(self._core, self._sender, self._task, timeout)
        return self.stats()

    async def __aenter__(self) -> AsyncMirrorClient:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MirrorClient(_MirrorClientBase):
    """Mirror client for synchronous (threaded) services: the sender runs on an asyncio loop
    in a daemon thread; ``publish`` is safe from any thread.

        mirror = MirrorClient(bootstrap="kafka:9092", sample_rates={"digits": 0.1})  # default bootstrap:
                                                      # env KAFKA_BOOTSTRAP, else 127.0.0.1:19092
        mirror.publish(request_id, "digits", "v3", {"x": x}, {"probs": p}, latency_ms)
        mirror.close()   # also run at interpreter exit

    Starts at construction; Kafka being down does not make it fail.
    """

    def __init__(self, config: MirrorConfig | None = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._loop = asyncio.new_event_loop()
        self._sender = KafkaSender(self._core)
        self._task: asyncio.Task | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,), name="shadowlens-mirror",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        loop, sender = self._loop, self._sender
        self._core.wake = lambda: loop.call_soon_threadsafe(sender.wake)
        # At exit, flush within the deadline; the weak reference lets an unclosed client be collected.
        ref = weakref.ref(self)
        self._atexit = lambda: (c := ref()) is not None and c.close()
        atexit.register(self._atexit)

    def _run_loop(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._sender.run(), name="shadowlens-mirror-sender")
        self._loop.call_soon(ready.set)
        self._loop.run_forever()
        self._loop.close()

    def close(self, timeout: float | None = None) -> MirrorStats:
        """Deliver what is buffered within ``timeout`` seconds (config.close_timeout_s), then stop
        the thread. Safe to call twice; never raises."""
        with self._close_lock:
            if self._closed:
                return self.stats()
            self._closed = True
        atexit.unregister(self._atexit)
        timeout = self.config.close_timeout_s if timeout is None else timeout
        done = asyncio.run_coroutine_threadsafe(
            drain_and_stop(self._core, self._sender, self._task, timeout), self._loop)
        try:
            done.result(timeout + 5.0)  # the coroutine keeps its own deadline; this is a backstop
        except Exception as exc:
            self._core.log.warning("close", "mirror: close did not finish cleanly: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        return self.stats()

    def __enter__(self) -> MirrorClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
