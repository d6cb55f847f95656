"""``shadowlens ingest``: KServe's logger posts here; mirrored requests come out on the mirror topic.

Topology (sources -> processors -> sinks):

    POST /v1/ingest/kserve[/<token>]  ->  half_from_http  ->  halves topic (key: service/id, acks=all)
    halves topic  ->  PartitionPairing (per partition)  ->  mirrored()  ->  mirror topic
                                                   \\->  unpaired, unusable  ->  dead-letter topic
                                                   (acknowledged, then the pairing's offsets committed)

The POST is answered 200 only once its event is on the halves topic, acknowledged by every in-sync
replica: an answered event is never lost. 503 while the broker cannot take it (KServe's logger
logs that and does not retry: the call is not mirrored, and nothing pretends it was). An event that
can never be used (not KServe's, an InferenceService not in ``[[ingest.kserve]]``) is a dead letter
with its reason and a 400 naming it; 401 without a token when ``[ingest] tokens`` are set.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from schemas import DeadLetter
from streams.config import ConfigError, Settings
from streams.ingest.kserve import Half, NotUsable, half_from_http, mirrored
from streams.ingest.pairing import PartitionPairing, Waiting
from streams.kafka_io import Health, Producer, consumer, ensure_topics, producer, until_done

log = logging.getLogger("shadowlens.ingest")
_MOVED = (CommitFailedError, IllegalStateError)  # the partition went to another process
MAX_POLL_RECORDS = 1000


def halves_topic(settings: Settings) -> str:
    return settings.ingest.halves_topic or f"{settings.kafka.topic}.kserve"


def pairing_group(settings: Settings) -> str:
    return settings.ingest.group_id or f"{settings.kafka.group_id}-ingest"


def check(settings: Settings) -> None:
    """What must hold before listening: one line each (exit 2)."""
    if not settings.ingest.kserve:
        raise ConfigError("[[ingest.kserve]] is empty: add one per InferenceService whose logger posts here "
                          "(inference_service, model; input and output names for the V1 protocol)")  # fmt: skip
    if (problem := settings.ingest.exposure_problem()) is not None:
        raise ConfigError(problem)
    for route in settings.ingest.kserve:  # V2 calls name their own tensors: only the V1 names can be wrong here
        compared = {c.baseline_output for c in settings.candidates if c.model == route.model}
        if not compared:
            log.warning("[[ingest.kserve]] %s: no candidate of model %r in [[candidates]]; its calls are mirrored "
                        "and wait for one (shadowlens candidates add)", route.inference_service, route.model)
        elif route.output not in compared:
            log.warning("[[ingest.kserve]] %s: V1 calls' predictions become output %r, but the candidates of model %r "
                        "compare baseline_output %s: set output = %r if this InferenceService speaks V1",
                        route.inference_service, route.output, route.model, sorted(compared), min(compared))


def create_app(settings: Settings, send_half, send_dead_letter):
    """The endpoint: ``send_half(key, value)`` and ``send_dead_letter(DeadLetter)`` write to Kafka and
    raise when the broker cannot take the record."""
    cfg = settings.ingest
    routes = {r.inference_service: r for r in cfg.kserve}
    accepted = [t.encode() for t in cfg.tokens]
    app = FastAPI(title="shadowlens ingest", version="1.0",
                  description="KServe's payload logger posts here (logger.url); see README, Zero-code ingest.")  # fmt: skip

    def authorized(request: Request, path_token: str | None) -> bool:
        if not accepted:
            return True
        offered = path_token or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return any(hmac.compare_digest(offered.encode(), t) for t in accepted)

    async def ingest(request: Request, path_token: str | None = None):
        if not authorized(request, path_token):
            raise HTTPException(status_code=401, detail="missing or wrong token: end logger.url with "
                                "/v1/ingest/kserve/<one of [ingest] tokens>")  # fmt: skip
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise HTTPException(status_code=413, detail=f"over [ingest] max_body_bytes ({cfg.max_body_bytes})")
        body = await request.body()
        if len(body) > cfg.max_body_bytes:
            raise HTTPException(status_code=413, detail=f"over [ingest] max_body_bytes ({cfg.max_body_bytes})")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            half = half_from_http(headers, body)
            if half.service not in routes:
                raise NotUsable(f"InferenceService {half.service[:128]!r} is not in [[ingest.kserve]]: add it "
                                "(inference_service, model) to the ingest config")  # fmt: skip
        except NotUsable as exc:
            letter = DeadLetter.for_payload(body, "invalid_schema", f"kserve: {exc}", topic="ingest:kserve",
                                            key=headers.get("ce-id"))  # fmt: skip
            await _or_503(send_dead_letter(letter))
            return JSONResponse(status_code=400, content={"detail": f"kserve: {exc}", "dead_letter": True})
        await _or_503(send_half(f"{half.service}/{half.id}".encode(), half.encode()))
        return {"accepted": half.kind, "id": half.id}

    app.add_api_route("/v1/ingest/kserve", ingest, methods=["POST"])
    app.add_api_route("/v1/ingest/kserve/{path_token}", ingest, methods=["POST"])
    return app


async def _or_503(sending) -> None:
    try:
        await sending
    except Exception as exc:  # noqa: BLE001 - the broker did not take it: not acknowledged, said so
        raise HTTPException(status_code=503, detail=f"Kafka did not take the event ({type(exc).__name__}); it was "
                            "not recorded") from None  # fmt: skip


class Pairer:
    """The halves topic's consumer: pairs, converts, writes the mirror topic and dead letters."""

    def __init__(self, settings: Settings, health: Health):
        self.settings, self.health = settings, health
        self.routes = {r.inference_service: r for r in settings.ingest.kserve}
        self.timeout_ms = int(settings.ingest.pair_timeout_s * 1000)
        self.partitions: dict[int, PartitionPairing] = {}
        self.counts = {"mirrored": 0, "dead_letters": 0}
        # Not transactional: the mirror topic is written as the producer SDK writes it. (A transaction's commit
        # marker sits at the end of a partition, and the replay stage would read it as lag: windows would then
        # never close by idleness.) Records are acknowledged before the offsets are committed; a crash between
        # writes a call twice, with the same request ids, and the judge drops the copy.
        self.out = Producer(settings, health, "kafka")

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka.structs import OffsetAndMetadata

        topic, group = halves_topic(self.settings), pairing_group(self.settings)
        reader = consumer(self.settings, topic, group, MAX_POLL_RECORDS, listener=_Forget(self.partitions))
        await until_done("kafka", self.health, reader.start)
        try:
            while not stop.is_set():
                batches = await reader.getmany(timeout_ms=500, max_records=MAX_POLL_RECORDS)
                records: list[dict] = []
                fed = set()
                for tp, messages in batches.items():
                    pairing = self.partitions.setdefault(tp.partition, PartitionPairing(self.timeout_ms))
                    fed.add(tp.partition)
                    for m in messages:
                        records += self._take(pairing, m)
                now_ms = int(time.time() * 1000)
                for partition, pairing in self.partitions.items():  # read to its end: the wall clock counts
                    records += [self._unpaired(w, partition) for w in pairing.expire(None if partition in fed
                                                                                     else now_ms)]  # fmt: skip
                offsets = {tp: OffsetAndMetadata(self.partitions[tp.partition].commit_offset(), "")
                           for tp in reader.assignment() if self.partitions.get(tp.partition) is not None
                           and self.partitions[tp.partition].next_offset >= 0}  # fmt: skip
                if records:
                    await self.out.send_all(records)
                if offsets and (records or batches):
                    try:
                        await until_done("kafka", self.health, lambda: reader.commit(offsets), give_up=_MOVED)
                    except _MOVED as exc:  # its new owner reads on from the last commit: copies, never a loss
                        log.warning("halves partitions moved before the commit (%s)", exc)
        finally:
            await reader.stop()
            await self.out.stop()

    def _take(self, pairing: PartitionPairing, message) -> list[dict]:
        try:
            half = Half.decode(message.value)
        except Exception as exc:  # noqa: BLE001 - not written by this endpoint: a dead letter, never a stop
            return [self._dead(DeadLetter.for_payload(message.value, "invalid_json", f"kserve halves topic: not a "
                                                      f"logged event ({type(exc).__name__})", topic=message.topic,
                                                      partition=message.partition, offset=message.offset))]  # fmt: skip
        pair = pairing.add(half, message.offset, message.timestamp)
        if pair is None:
            return []
        request, response = pair
        try:
            requests = mirrored(request, response, self.routes[request.service])
        except (NotUsable, KeyError) as exc:
            reason = f"kserve: call {request.id[:100]!r} of InferenceService {request.service[:100]!r}: {exc}"
            return [self._dead(DeadLetter.for_payload(_pair_json(request, response), "invalid_schema", reason,
                                                      topic=message.topic, partition=message.partition,
                                                      offset=message.offset, key=request.id))]  # fmt: skip
        self.counts["mirrored"] += len(requests)
        return [{"topic": self.settings.kafka.topic, "key": r.request_id.encode(), "value": r.model_dump_json().encode()}
                for r in requests]  # fmt: skip

    def _unpaired(self, waiting: Waiting, partition: int) -> dict:
        h, s = waiting.half, f"{self.settings.ingest.pair_timeout_s:g} s"
        if h.kind == "request":
            why = (f"no response event within {s}: the model answered non-200 (KServe logs only 200 responses), or "
                   "the logger's mode is 'request' (use mode: all)")  # fmt: skip
        else:
            why = (f"no request event within {s}: the logger's mode is 'response' (use mode: all), or its request "
                   "event was not delivered (KServe's logger does not retry)")  # fmt: skip
        reason = f"kserve: the {h.kind} event of call {h.id[:100]!r} of InferenceService {h.service[:100]!r} had {why}"
        return self._dead(DeadLetter.for_payload(h.encode(), "unpaired", reason, topic=halves_topic(self.settings),
                                                 partition=partition, offset=waiting.offset, key=h.id))  # fmt: skip

    def _dead(self, letter: DeadLetter) -> dict:
        self.counts["dead_letters"] += 1
        log.warning("dead letter: %s", letter.reason)
        return {"topic": self.settings.kafka.dead_letter_topic, "value": letter.model_dump_json().encode()}


class _Forget(ConsumerRebalanceListener):
    """A partition given to another process is forgotten here; it is re-read from its commit when it
    comes back, so its waiting halves are found again."""

    def __init__(self, partitions: dict[int, PartitionPairing]):
        self.partitions = partitions

    def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.partitions.pop(tp.partition, None)

    def on_partitions_assigned(self, assigned) -> None:
        for tp in assigned:
            self.partitions.pop(tp.partition, None)


def _pair_json(request: Half, response: Half) -> bytes:
    return b'{"request":' + request.encode() + b',"response":' + response.encode() + b"}"


async def serve(settings: Settings) -> None:
    import uvicorn

    from streams.api.app import bind

    check(settings)
    sock = bind(settings.ingest.host, settings.ingest.port)
    health = Health.for_settings(settings)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await until_done("kafka", health, lambda: ensure_topics(settings, extra=[(halves_topic(settings),
                                                                              settings.kafka.partitions)]))  # fmt: skip
    out = producer(settings)
    await until_done("kafka", health, out.start)
    topic = halves_topic(settings)

    async def send_half(key: bytes, value: bytes) -> None:
        await asyncio.wait_for(await out.send(topic, value, key=key), 15)

    async def send_dead_letter(letter: DeadLetter) -> None:
        await asyncio.wait_for(await out.send(settings.kafka.dead_letter_topic, letter.model_dump_json().encode()), 15)

    server = uvicorn.Server(uvicorn.Config(create_app(settings, send_half, send_dead_letter), log_level="warning",
                                           lifespan="off", access_log=False))  # fmt: skip
    pairer = Pairer(settings, health)
    host, port = sock.getsockname()[:2]
    log.info("ingest: KServe's logger posts to http://%s:%s/v1/ingest/kserve%s; halves topic %s, mirror topic %s",
             host, port, "/<token>" if settings.ingest.tokens else "", topic, settings.kafka.topic)
    pairing = asyncio.create_task(pairer.run(stop), name="pairing")
    http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    stopped = asyncio.create_task(stop.wait(), name="stop")
    try:  # until a signal, or either half ends (its error, raised below, stops the other)
        done, _ = await asyncio.wait({pairing, http, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopped}:
            task.result()
    finally:
        server.should_exit = True
        await asyncio.gather(http, return_exceptions=True)
        stop.set()
        await asyncio.gather(pairing, return_exceptions=True)
        stopped.cancel()
        await out.stop()
        log.info("ingest stopped: %d requests mirrored, %d dead letters", pairer.counts["mirrored"],
                 pairer.counts["dead_letters"])


def run_ingest(settings: Settings, loglevel: str = "info") -> None:
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    asyncio.run(serve(settings))
