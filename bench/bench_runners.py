"""Candidate throughput through shadowlens next to the raw runtime on the same model and device,
at micro-batch sizes 1..1024 (bench/gpu_check.sh runs it on a GPU machine; ``--device cpu`` here).

For each runtime (onnxruntime; torch, TorchScript and torch.export, when torch is installed), rows/s:

- ``raw``: the runtime alone on the stacked inputs: ``session.run`` / ``module(x)``, numpy in and
  numpy out (torch: ``from_numpy(...).to(device)``, ``.cpu().numpy()``), nothing else;
- ``runner batched`` / ``runner sampled``: the replay core's call of the candidate
  (``run_stacked``; sampled: plus ``time_alone`` of the rows ``timed_rows`` picks, 2 % and at
  least one a micro-batch, as ``[replay]`` defaults);
- ``replay``: ``ReplayCore.replay`` on mirrored messages in micro-batches of that size (decode,
  stacking, adapter, the candidate in the default timing, paired diffs), one candidate, no Kafka.

The figure is the ratio to ``raw``. Each rate is the median of ``--repeats`` timed loops of at
least ``--min-s`` seconds each. The model is an MLP on the digits input (``--hidden`` ReLU layers,
weights from scikit-learn, streams.models.build_torch_twins), so a GPU has something to do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.replay.runner import timed_rows  # noqa: E402


def rate(fn, rows: int, min_s: float, repeats: int) -> float:
    fn()  # warm-up (allocations, CUDA kernels, graph caches)
    out = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                break
        out.append(calls * rows / elapsed)
    return statistics.median(out)


def raw_onnx(path: Path, device: str):
    import onnxruntime as ort

    from streams.replay.runner import choose_providers

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    providers = choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda"
                                 else ["CPUExecutionProvider"])  # fmt: skip
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"onnxruntime runs {path.name} on {session.get_providers()}, not CUDA")
    return lambda x: session.run(["probabilities"], {"image": x})[0]


def raw_torch(runner):
    torch, module, device, pick = runner.torch, runner.module, runner.device, runner._pick

    def call(x):
        with torch.inference_mode():
            return pick(module(torch.from_numpy(x).to(device)), "probabilities").cpu().numpy()

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--min-s", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a dry run: small model, batches 1 64 1024, short loops")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.hidden, args.min_s, args.repeats = [1, 64, 1024], [64], 0.05, 1

    from streams.config import load_settings
    from streams.demo import V1_TO_V2_ADAPTER, TrafficGenerator
    from streams.models import build_digits_models
    from streams.replay.core import Inbound, ReplayCore
    from streams.replay.runner import OnnxRunner, load_runner

    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        digits = build_digits_models(work / "digits")
        if have_torch:
            from streams.models import build_torch_twins

            twins = build_torch_twins(work / "twins", hidden=tuple(args.hidden))
            files = {"onnx": twins["mlp"], "torchscript": twins["mlp-trace"], "torch.export": twins["mlp-export"]}
        else:
            print("torch is not installed: onnxruntime only (pip install 'shadowlens[torch]')")
            files = {"onnx": _mlp_onnx_only(work, tuple(args.hidden))}
        n_msgs = max(args.batches) * 4
        messages = TrafficGenerator(digits["baseline"], rate_per_s=1000).messages(n_msgs)
        inbound = [Inbound(m, 0, i) for i, m in enumerate(messages)]
        x_all = np.random.default_rng(0).random((max(args.batches), 64), dtype=np.float32)
        ids = np.arange(max(args.batches), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # spread hashes
        print(f"device {args.device}; model MLP 64 -> {' -> '.join(map(str, args.hidden))} -> 10; rows/s, median of "
              f"{args.repeats} loops of >= {args.min_s} s")  # fmt: skip
        header = f"{'runtime':13} {'batch':>5} {'raw':>12} {'runner batched':>15} {'runner sampled':>15} {'replay':>12}"
        print(header + "   batched/raw sampled/raw replay/raw")
        for name, path in files.items():
            runner = load_runner(path, "onnx" if name == "onnx" else "torch", providers)
            where = runner.providers[0]
            if args.device == "cuda" and where != "CUDAExecutionProvider":
                raise SystemExit(f"{name}: runs on {where}, not CUDA")
            raw = raw_onnx(path, args.device) if isinstance(runner, OnnxRunner) else raw_torch(runner)
            settings = load_settings(overrides={
                "replay": {"providers": providers},
                "windows": {"size_s": 3600},
                "candidates": [{"name": name, "model": "digits", "path": str(path), "adapter": V1_TO_V2_ADAPTER}],
            })  # fmt: skip
            core = ReplayCore(settings)
            for b in args.batches:
                x = x_all[:b]
                feeds = {"image": x}
                rows = timed_rows(ids[:b], settings.replay.timing_sample, np.zeros(b, dtype=np.int64), 3_600_000,
                                  settings.replay.timing_min_per_window)  # fmt: skip

                def sampled(feeds=feeds, b=b, rows=rows, runner=runner):
                    runner.run_stacked(feeds, b, "probabilities", "sampled")
                    runner.time_alone(feeds, "probabilities", rows)

                chunks = [inbound[lo : lo + b] for lo in range(0, n_msgs, b)]
                state = {"i": 0}

                def replay(chunks=chunks, state=state, core=core):
                    core.replay(chunks[state["i"] % len(chunks)])
                    state["i"] += 1

                r_raw = rate(lambda x=x, raw=raw: raw(x), b, args.min_s, args.repeats)
                r_bat = rate(lambda feeds=feeds, b=b, runner=runner: runner.run_stacked(feeds, b, "probabilities",
                                                                                     "batched"), b, args.min_s,
                             args.repeats)  # fmt: skip
                r_smp = rate(sampled, b, args.min_s, args.repeats)
                r_rep = rate(replay, b, args.min_s, args.repeats)
                print(f"{name:13} {b:>5} {r_raw:>12,.0f} {r_bat:>15,.0f} {r_smp:>15,.0f} {r_rep:>12,.0f}   "
                      f"{r_bat / r_raw:11.2f} {r_smp / r_raw:11.2f} {r_rep / r_raw:10.2f}", flush=True)


def _mlp_onnx_only(work: Path, hidden: tuple[int, ...]) -> Path:
    """The MLP as ONNX without torch (scikit-learn + skl2onnx)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from streams.models import PIXEL_SCALE, _to_onnx, load_digits_split

    data = load_digits_split(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=30, random_state=0).fit(data.train_x / PIXEL_SCALE,
                                                                                        data.train_y)  # fmt: skip
    path = work / "digits-mlp.onnx"
    path.write_bytes(_to_onnx(mlp, "image", 64))
    return path


if __name__ == "__main__":
    main()
