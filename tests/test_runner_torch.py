"""The torch runner (streams/replay/runner_torch.py): TorchScript and torch.export candidates replayed
through the real replay path agree with their ONNX twins; pickled modules are never loaded; CUDA
where a device is (skipped elsewhere). bench/gpu_check.sh: its CPU dry run runs, and without a
device it fails at once. The torch tests need the ``torch`` extra and skip without it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streams.replay.blame import CandidateRefused
from streams.config import CandidateConfig, load_settings
from streams.demo import V1_TO_V2_ADAPTER, TrafficGenerator
from streams.replay.core import Candidate, Inbound, ReplayCore

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("candidate_label", "label_flip", "confidence_delta", "l1", "linf", "hellinger", "topk_overlap",
           "candidate_confidence")  # fmt: skip


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def twins(torch, tmp_path_factory) -> dict[str, Path]:
    from streams.models import build_torch_twins

    return build_torch_twins(tmp_path_factory.mktemp("twins"), hidden=(32,))


@pytest.fixture(scope="module")
def traffic(models) -> list[bytes]:
    return TrafficGenerator(models["baseline"], rate_per_s=200).messages(600)


def replay(settings, messages, batch=128):
    core = ReplayCore(settings)
    by_cand: dict[str, list] = {}
    for lo in range(0, len(messages), batch):
        out = core.replay([Inbound(m, 0, lo + i) for i, m in enumerate(messages[lo : lo + batch])])
        assert not out.dead_letters, [d.reason for d in out.dead_letters]
        for b in out.batches:
            by_cand.setdefault(b.candidate, []).append(b)
    return core, by_cand


def twin_settings(onnx: Path, other: Path, timing: str = "sampled", providers=None, **more):
    cands = [{"name": "onnx", "model": "digits", "path": str(onnx), "adapter": V1_TO_V2_ADAPTER},
             {"name": "torch", "model": "digits", "path": str(other), "adapter": V1_TO_V2_ADAPTER, **more}]  # fmt: skip
    replay = {"timing": timing, **({"providers": providers} if providers else {})}
    return load_settings(overrides={"replay": replay, "windows": {"size_s": 1}, "candidates": cands})


@pytest.mark.parametrize(("onnx", "other"), [("good", "good-script"), ("good", "good-export"),
                                             ("mlp", "mlp-trace"), ("mlp", "mlp-export")])  # fmt: skip
@pytest.mark.parametrize("timing", ["sampled", "per_request"])
def test_a_torch_candidate_and_its_onnx_twin_give_the_same_diffs(twins, traffic, onnx, other, timing):
    settings = twin_settings(twins[onnx], twins[other], timing)
    assert [c.runtime for c in settings.candidates] == ["onnx", "torch"]  # from the suffix
    core, by_cand = replay(settings, traffic)
    runner = core.candidates["digits"][1].runner
    assert runner.runtime == "torch" and runner.kind == ("export" if other.endswith("export") else "script")
    assert runner.providers == ["CPUExecutionProvider"] or _cuda()
    for a, b in zip(by_cand["onnx"], by_cand["torch"], strict=True):
        assert a.request_id == b.request_id and set(a.error) == set(b.error) == {""}
        for col in COLUMNS:
            np.testing.assert_allclose(a.columns[col], b.columns[col], rtol=1e-5, atol=1e-5, err_msg=col)
        # Both runtimes time the same requests alone (sampled: the id hash decides, not the runtime).
        timed = np.isfinite(a.columns["candidate_latency_ms"])
        assert np.array_equal(timed, np.isfinite(b.columns["candidate_latency_ms"]))
        assert timed.all() if timing == "per_request" else not timed.all()
        assert (b.columns["candidate_latency_ms"][timed] > 0).all()


def test_torch_runner_interface(twins):
    from streams.replay.runner import InputShapeError, load_runner

    for name in ("good-script", "good-export"):
        runner = load_runner(twins[name])
        assert runner.output_names == ["probabilities"] and runner.input_dtypes == {"image": np.dtype("float32")}
        assert runner.inputs["image"].type == "tensor(float)" and runner.inputs["image"].shape == [None, 64]
        assert [i.name for i in runner.session.get_inputs()] == ["image"]  # what streams/doctor/checks.py reads
        x = np.random.default_rng(1).random((24, 64), dtype=np.float32)
        x.flags.writeable = False  # stacked requests are read-only views of the messages' bytes
        batched, lat = runner.run_stacked({"image": x}, 24, "probabilities", "batched")
        per_row, lat_rows = runner.run_stacked({"image": x}, 24, "probabilities", "per_request")
        sampled, nan = runner.run_stacked({"image": x}, 24, "probabilities", "sampled")
        np.testing.assert_allclose(batched, per_row, rtol=1e-5, atol=1e-6)
        assert np.array_equal(batched, sampled) and np.isnan(nan).all() and (lat_rows > 0).all()
        assert np.ptp(lat) == 0 and (runner.time_alone({"image": x}, "probabilities", [0, 5]) > 0).all()
        with pytest.raises(InputShapeError, match="inputs.image"):
            runner.check_row({"image": np.zeros((1, 32), dtype=np.float32)})


def test_the_doctor_describes_a_torch_candidate(twins):
    from streams.doctor.checks import OK, load_candidates

    settings = twin_settings(twins["good"], twins["good-export"])
    loaded, checks = load_candidates(settings)
    assert [c.status for c in checks] == [OK, OK], [c.line() for c in checks]
    assert "image float32[?,64]" in checks[1].detail and "probabilities float32[?,10]" in checks[1].detail


def test_runtime_comes_from_the_suffix_unless_configured(twins, tmp_path):
    def cfg(path, **more):
        return CandidateConfig(name="c", model="digits", path=path, **more)

    assert cfg(twins["good"]).runtime == "onnx"
    assert cfg(twins["good-script"]).runtime == cfg(twins["good-export"]).runtime == "torch"
    assert cfg(twins["good-script"], runtime="onnx").runtime == "onnx"
    with pytest.raises(CandidateRefused, match="not a TorchScript or torch.export archive"):
        Candidate.load(cfg(twins["good"], runtime="torch"), None)  # an ONNX file run on torch
    with pytest.raises(Exception) as info:  # a torch file given to onnxruntime: onnxruntime's own error
        Candidate.load(cfg(twins["good-script"], runtime="onnx"), None)
    assert type(info.value).__module__.startswith("onnxruntime")


class _Marker:
    """Unpickling this object creates a file: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickled_module_is_refused_and_never_unpickled(torch, twins, tmp_path):
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Marker(marker)}, evil)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(64, 10), module)
    for path in (evil, module):
        with pytest.raises(CandidateRefused, match="pickled object .* never loads") as info:
            Candidate.load(CandidateConfig(name="c", model="digits", path=path), None)
        assert "\n" not in str(info.value) and "torch.export" in str(info.value)
    assert not marker.exists()


def test_declarations_a_torch_candidate_needs_are_refused_in_one_line(torch, twins, tmp_path):
    bare = tmp_path / "bare.pt"
    shutil.copy(twins["good-script"], tmp_path / "src.pt")
    from streams.replay.runner_torch import TorchRunner

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(TorchRunner(tmp_path / "src.pt").module, str(bare))  # no shadowlens.json
    with pytest.raises(CandidateRefused, match="shadowlens.json") as info:
        Candidate.load(CandidateConfig(name="c", model="digits", path=bare), None)
    assert "\n" not in str(info.value)
    with pytest.raises(CandidateRefused, match="candidates.c.output: 'logits' is not an output"):
        Candidate.load(CandidateConfig(name="c", model="digits", path=twins["good-export"], output="logits"), None)


def test_a_torch_candidate_without_torch_is_refused(twins, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(CandidateRefused, match=r"pip install 'shadowlens\[torch\]'"):
        Candidate.load(CandidateConfig(name="c", model="digits", path=twins["good-export"]), None)


@pytest.mark.skipif(not _cuda(), reason="needs torch with CUDA and a CUDA device")
def test_cuda_torch_runner_agrees_with_cpu(twins, traffic):
    """On a GPU machine torch candidates run on CUDA (pinned inputs, asynchronous copies); their
    answers differ from CPU's only by numeric noise, through the replay path too."""
    from streams.replay.runner_torch import TorchRunner

    x = np.random.default_rng(2).random((256, 64), dtype=np.float32)
    for name in ("mlp-trace", "mlp-export"):
        gpu, cpu = TorchRunner(twins[name]), TorchRunner(twins[name], device="cpu")
        assert gpu.device.type == "cuda" and gpu.providers == ["CUDAExecutionProvider"]
        on_gpu, _ = gpu.run_stacked({"image": x}, 256, "probabilities", "batched")
        on_cpu, _ = cpu.run_stacked({"image": x}, 256, "probabilities", "batched")
        np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4)
        assert (gpu.time_alone({"image": x}, "probabilities", [0, 100, 255]) > 0).all()
    _, by_cand = replay(twin_settings(twins["mlp"], twins["mlp-export"]), traffic)
    for a, b in zip(by_cand["onnx"], by_cand["torch"], strict=True):
        np.testing.assert_allclose(a.columns["l1"], b.columns["l1"], atol=1e-4)


@pytest.mark.skipif(not _cuda(), reason="needs torch with CUDA and a CUDA device")
def test_cuda_onnx_binding_agrees_with_session_run(twins):
    """onnxruntime on CUDA: the batched call goes through IOBinding and answers as session.run does."""
    import onnxruntime as ort

    from streams.replay.runner import OnnxRunner

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    runner = OnnxRunner(str(twins["mlp"]))
    assert runner.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(3).random((512, 64), dtype=np.float32)
    bound, _ = runner.run_stacked({"image": x}, 512, "probabilities", "batched")
    assert runner._binding  # still bound: it did not fail
    plain = runner.session.run(["probabilities"], {"image": x})[0]
    np.testing.assert_allclose(bound, plain, atol=1e-6)


def test_onnx_io_binding_path_answers_as_session_run(models):
    """The IOBinding path (used on CUDA) forced on CPU, where binding works too: the same answers;
    a binding that fails once is logged and replaced by session.run, never a candidate error."""
    from streams.replay.runner import OnnxRunner

    runner = OnnxRunner(str(models["good"]))
    assert not runner._binding  # CPU: nothing to bind
    x = np.random.default_rng(4).random((300, 64), dtype=np.float32)
    plain, _ = runner.run_stacked({"image": x}, 300, "probabilities", "batched")
    runner._binding = True
    bound, _ = runner.run_stacked({"image": x[::-1][::-1]}, 300, "probabilities", "batched")
    np.testing.assert_array_equal(bound, plain)

    def broken(feeds, output):
        raise RuntimeError("no device memory")

    runner._bound = broken
    again, _ = runner.run_stacked({"image": x}, 300, "probabilities", "batched")
    np.testing.assert_array_equal(again, plain)
    assert runner._binding is False


# -- bench/gpu_check.sh ---------------------------------------------------------------------------
def test_gpu_check_cpu_dry_run_runs():
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=_env())  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "dry run on CPU" in out and "sampled/raw" in out
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("onnx ")]
    assert [int(parts[1]) for parts in lines] == [1, 64, 1024], out[-2000:]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU driver is present")
def test_gpu_check_without_a_device_fails_fast_and_loud():
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--no-install"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=_env())  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("gpu_check: no CUDA device") and "--cpu" in proc.stderr
    assert proc.stdout == ""  # nothing ran


def _env() -> dict:
    import os

    return {**os.environ, "PYTHON": sys.executable}


def test_twins_declare_their_io(twins):
    """What build_torch_twins writes is what a hand-made TorchScript file must carry."""
    import zipfile

    with zipfile.ZipFile(twins["good-script"]) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/shadowlens.json"))
        meta = json.loads(archive.read(name))
    assert meta["inputs"] == [{"name": "image", "dtype": "float32", "shape": [None, 64]}]
    assert meta["outputs"][0]["name"] == "probabilities"
