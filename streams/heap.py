"""The cycle collector, tuned for a streaming worker once its start-up is done.

A worker imports numpy, scipy, onnxruntime, pydantic and friends and loads its models before the
first message: several hundred thousand long-lived objects. CPython's full collection scans every
tracked object, and the replay and judge stages allocate enough containers per micro-batch that
collections come round often; each full one re-scanned that start-up heap, which never becomes
garbage. Two settings, both process-wide and both standard for long-running servers:

* ``gc.freeze()`` (the gc docs' recipe for forking servers, used to the same end by large Python
  services) moves what exists now into a permanent generation that collections skip; reference
  counting still frees those objects if they are dropped. Collect first, so that no cyclic garbage
  is frozen in.
* the youngest generation is collected every ``YOUNG_THRESHOLD`` net container allocations instead
  of 700: a micro-batch allocates thousands, nearly all freed by reference counting at its end, so
  a young collection every 700 mostly walks objects that are about to go anyway. Cyclic garbage
  waits a little longer (it is rare here: the hot path builds no cycles).

Measured with bench/bench_stages.py's pipeline, side by side: see the README.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def tune_collector() -> int:
    """Collect, freeze every object alive now, raise the young generation's threshold; returns
    how many objects are frozen. Call once, after models and connections are set up."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
    return gc.get_freeze_count()
