"""streams.heap: the worker's collector settings, checked in a process of its own (they are
process-wide, and the test process must keep its own)."""

import subprocess
import sys
import textwrap


def test_tune_collector_collects_cyclic_garbage_first_then_freezes_and_raises_the_young_threshold():
    code = textwrap.dedent("""
        import gc, weakref
        from streams.heap import YOUNG_THRESHOLD, tune_collector

        class Node:
            pass

        gc.disable()  # keep the cycle alive until tune_collector's own collection
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        kept = [Node() for _ in range(100)]
        frozen = tune_collector()
        gc.enable()
        assert gone() is None, "cyclic garbage was frozen in instead of collected"
        assert frozen >= 100 and gc.get_freeze_count() == frozen
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
