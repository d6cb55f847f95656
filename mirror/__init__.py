"""shadowlens mirror SDK: production services mirror requests, outputs and latency to Kafka.

    from mirror import MirrorClient
    mirror = MirrorClient(bootstrap="kafka:9092", sample_rates={"digits": 0.1})  # default bootstrap:
                                                  # env KAFKA_BOOTSTRAP, else 127.0.0.1:19092
    mirror.publish(request_id, "digits", "v3", {"x": x}, {"probs": probs}, latency_ms,
                   {"country": "de"}, sample_key=user_id)

Depends only on ``schemas/`` and third-party libraries.
"""

from mirror.client import AsyncMirrorClient, MirrorClient
from mirror.config import DEFAULT_TOPIC, MirrorConfig, MirrorSettingError
from mirror.errors import MirrorError
from mirror.metrics import MirrorStats
from mirror.middleware import Exchange, MirrorMiddleware
from mirror.sampling import Sampler, sample_position
from mirror.validation import ModelSignature, TensorSpec

__all__ = [
    "DEFAULT_TOPIC",
    "AsyncMirrorClient",
    "MirrorClient",
    "MirrorConfig",
    "Exchange",
    "MirrorError",
    "MirrorMiddleware",
    "MirrorSettingError",
    "MirrorStats",
    "ModelSignature",
    "Sampler",
    "TensorSpec",
    "sample_position",
]
