"""The replay stage: mirrored requests in, paired diffs and dead letters out.

``core`` (ReplayCore: decode, adapt, batched calls per candidate, columnar diffs), ``stage`` (the Kafka
loop and its transaction), the runners (``runner`` onnxruntime, ``runner_torch``), and what they
share: ``stacking``, ``columns``, ``adapter``, ``blame``, ``evidence_keys``, ``letter_log``, ``replicas``.
"""
