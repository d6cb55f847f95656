"""The judge stage: paired diffs in; rows, windows and verdicts to ClickHouse, state on a changelog.

``core`` (JudgeCore), ``stage`` (the Kafka loop, the changelog restore), ``windows``, ``kinds`` (what a
verdict says per output kind), ``recent_ids`` (dedup), ``history``, ``rejudge``, ``retire``.
"""
