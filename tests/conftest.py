"""Shared fixtures. The Triton interpreter must be switched on before triton is imported, so it is done here,
before any test module imports fastcache_rt's backends."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (the README's test command runs one worker per core): one intra-op thread per worker, so the workers
# do not oversubscribe the cores
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") != "1":
    torch.set_num_threads(1)

import pytest  # noqa: E402

from fastcache_rt.ops import _backend  # noqa: E402

FAST_BACKENDS = ("cpu", "triton", "cuda")


def _device_for(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def available_fast_backends() -> list[str]:
    info = _backend.backends()
    return [n for n in FAST_BACKENDS if info[n]["available"] and _device_for(n) in info[n]["devices"]]


def pytest_report_header(config):
    info = _backend.backends()
    lines = []
    for name, row in info.items():
        state = "available" if row["available"] else f"unavailable ({row['reason']})"
        lines.append(f"fastcache_rt backend {name}: {state}")
    return lines


def required_backends() -> set[str]:
    """Backends whose absence fails the suite instead of skipping it: the C++ CPU backend that the install builds,
    Triton (a test dependency; interpreted on the CPU here), and CUDA wherever a GPU is visible.
    FASTCACHE_RT_TEST_OPTIONAL=name,... relaxes this (e.g. for a build without the C++ extension)."""
    req = {"cpu", "triton"}
    if torch.cuda.is_available():
        req.add("cuda")
    optional = {s.strip() for s in os.environ.get("FASTCACHE_RT_TEST_OPTIONAL", "").split(",") if s.strip()}
    return req - optional


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request):
    """(name, module, device) of each fast backend; skipped with the backend's own reason when unavailable,
    failed instead when the backend is required here."""
    name = request.param
    info = _backend.backends()[name]
    if not info["available"]:
        if name in required_backends():
            pytest.fail(f"required backend {name} is unavailable: {info['reason']}")
        pytest.skip(f"{name} backend unavailable: {info['reason']}")
    dev = _device_for(name)
    if dev not in info["devices"]:
        pytest.skip(f"{name} backend does not run on {dev} here")
    return name, _backend.get(name), torch.device(dev)


def pytest_collection_modifyitems(config, items):
    """``gpu``: the cases of the backend matrices (``fast_backend``) that run on a GPU when one is present (the
    CUDA backend, Triton compiled): ``python -m pytest -m gpu`` is the GPU subset.

    The developer loop (``-m "not slow"``) runs the Triton kernels in the CPU interpreter on float32 only: there,
    the float16 / bfloat16 cases of the backend-vs-reference matrices (``fast_backend`` x ``dtype``) are marked slow
    (1-5 s each). The full suite runs them all; with a GPU nothing is marked slow (the kernels run compiled)."""
    gpu = torch.cuda.is_available()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("fast_backend") in ("triton", "cuda"):
            item.add_marker(pytest.mark.gpu)
        if not gpu and params.get("fast_backend") == "triton" and params.get("dtype", torch.float32) != torch.float32:
            item.add_marker(pytest.mark.slow)


def is_triton(name: str) -> bool:
    """True for the Triton backend running in the CPU interpreter (slow: tests keep its sizes small)."""
    return name == "triton" and not torch.cuda.is_available()


def interpreter_keeps(name: str, *key, every: int) -> bool:
    """Under the Triton CPU interpreter, run one case in ``every`` of a parametrised matrix, picked by a stable hash
    of the case so that every value of every parameter still appears across the kept cases. Other backends run all."""
    if not is_triton(name):
        return True
    return zlib.crc32(repr(key).encode()) % every == 0


@pytest.fixture
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared machine the threads' waiting costs far more
    than the work: run the test on one thread, and restore the setting after it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny FLUX pipeline with text encoders (``fastcache_rt.testing.pipelines.tiny_pipeline``) saved as a
    diffusers folder (what ``--model PATH`` loads)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from fastcache_rt.testing.pipelines import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipeline().save_pretrained(path)
    return path
