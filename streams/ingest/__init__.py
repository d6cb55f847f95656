"""Zero-code ingest: a serving layer's own logs become mirrored requests (``shadowlens ingest``).

KServe's payload logger (kserve.py) posts a call's request and response as two CloudEvents;
service.py takes each one into a Kafka topic before answering (nothing acknowledged is lost), and
pairs them there (pairing.py) into MirroredRequests on the mirror topic, unusable ones into the
dead-letter topic with their reason, in one Kafka transaction with the pairing's offsets.
"""
