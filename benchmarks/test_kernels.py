"""Kernel-op microbenchmarks on pytest-benchmark: per op and per backend, one benchmark group per (op, dtype,
shape, device) holding side by side our op through each backend, the same op allocating its result (forecasts), a
same-bytes tensor copy into a preallocated tensor (the memory-bandwidth roof) and the eager way peers compute the
same thing (``kernel_cases.PEERS``). Inputs, calls and checks: ``benchmarks/kernel_cases.py``; options:
``benchmarks/conftest.py``.

    python -m pytest benchmarks/test_kernels.py --benchmark-json kernels.json
    python benchmarks/bench_table.py kernels.json          # ratios: vs peer, vs reference, of the copy roof

Every benchmark records ``extra_info`` (op, role, impl, backend, dtype, shape, device, bytes, group key) so that
ratios can be computed from the JSON; ``--benchmark-save`` / ``--benchmark-compare`` work as usual (names are
stable: ``test_kernel[<device>-<dtype>-<op>-<role>-<impl>]``).
"""

from __future__ import annotations

import gc

import pytest
import torch
from kernel_cases import (
    ALL_OPS,
    FLUX_SHAPE,
    FORECASTS,
    HOST,
    ORDER,
    PEERS,
    QUICK_SHAPE,
    SMALL,
    Workload,
    copy_roof,
    default_backends,
    must_move_bytes,
    op_label,
    option,
    parse_shape,
    quick,
    shape_str,
    synced,
)


def _plan(config) -> list[tuple]:
    """(device, dtype name, op, role, impl) of every benchmark, in run order."""
    shape_opt = option(config, "kernel_shape")
    shape = parse_shape(shape_opt) if shape_opt else (QUICK_SHAPE if quick(config) else FLUX_SHAPE)
    dtypes = [d.strip() for d in option(config, "kernel_dtypes").split(",") if d.strip()]
    devices = option(config, "kernel_devices")
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) if devices == "auto" else [
        d.strip() for d in devices.split(",") if d.strip()]
    want_ops = option(config, "kernel_ops")
    op_names = ALL_OPS if want_ops == "all" else tuple(o.strip() for o in want_ops.split(",") if o.strip())
    unknown = set(op_names) - set(ALL_OPS)
    if unknown:
        raise pytest.UsageError(f"--kernel-ops: unknown ops {sorted(unknown)}; choose from {', '.join(ALL_OPS)}")
    requested = option(config, "kernel_backends")
    history = int(option(config, "kernel_history"))
    plan = []
    for dev in devices:
        auto = default_backends(dev)
        backends = auto if requested == "auto" else [b.strip() for b in requested.split(",") if b.strip()]
        for i, dname in enumerate(dtypes):
            if not isinstance(getattr(torch, dname, None), torch.dtype):
                raise pytest.UsageError(f"--kernel-dtypes: unknown dtype {dname!r}")
            for op in op_names:
                if op in SMALL + HOST and i > 0:
                    continue  # float32 state/sums/taus whatever the feature dtype: once per device
                if op in HOST:
                    plan.append((dev, shape, history, dname, op, "host", "host"))
                    continue
                for b in backends:
                    plan.append((dev, shape, history, dname, op, "op", b))
                if op in FORECASTS:
                    plan.extend((dev, shape, history, dname, op, "alloc", b) for b in backends if b != "reference")
                if op not in SMALL:
                    plan.append((dev, shape, history, dname, op, "copy", "copy"))
                if op in PEERS:
                    plan.append((dev, shape, history, dname, op, "peer", PEERS[op][0].replace(" ", "_")))
    return plan


def pytest_generate_tests(metafunc):
    if "kernel_entry" in metafunc.fixturenames:
        plan = _plan(metafunc.config)
        ids = [f"{d}-{dt}-{op}-{role}" + ("" if impl in ("copy", "host") or role == "peer" else f"-{impl}")
               for d, _s, _h, dt, op, role, impl in plan]
        metafunc.parametrize("kernel_entry", plan, ids=ids)


_current: dict = {}


def _workload(device, shape, history, dname) -> Workload:
    key = (device, shape, history, dname)
    if key not in _current:
        _current.clear()  # one workload alive at a time (FLUX fp32 holds ~1 GB of inputs)
        gc.collect()
        _current[key] = Workload(shape, getattr(torch, dname), device, history=history, order=ORDER)
    return _current[key]


def test_kernel(benchmark, kernel_entry):
    device, shape, history, dname, op, role, impl = kernel_entry
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w = _workload(device, shape, history, dname)
    case = w.cases((op,))[op]
    backend = impl if role in ("op", "alloc") else None
    if role == "op":
        case.check(impl)  # refuses to time a backend that disagrees with the reference here
        fn = case.timed(impl)
    elif role == "alloc":
        case.check(impl)
        fn = case.alloc(impl)
    elif role == "copy":
        fn = copy_roof(case.nbytes, device)
    elif role == "peer":
        case.check("reference", peer=True)  # the peer computes the same thing
        fn = case.peer[2]
    else:
        fn = case.timed("host")
    fn = synced(fn, device)
    fn()  # warm-up (first-touch page faults, caches, Triton compilation)

    group = f"{case.label} {dname if op not in SMALL + HOST else 'float32'} {shape_str(shape)} {device}"
    benchmark.group = group
    benchmark.extra_info.update(
        op=op,
        label=case.label,
        role=role,
        impl=impl,
        backend=backend,
        dtype=dname if op not in SMALL + HOST else "float32",
        feature_dtype=dname,
        shape=list(shape),
        device=device,
        bytes=case.nbytes,
        history=history,
        order=ORDER,
        case=group,
        threads=torch.get_num_threads(),
        peer=PEERS[op][1] if role == "peer" else None,
        note={"copy": "same-bytes uint8 copy into a preallocated tensor (bytes/2 read, bytes/2 written)",
              "alloc": "the forecast allocating its result (no out=)",
              "op": "out= preallocated; device tensors for every scalar; no host read" if op in FORECASTS else
              "device tensors for every scalar; no host read"}.get(role),
    )
    assert case.nbytes is None or case.nbytes == must_move_bytes(
        op, w.numel, w.elsize, history if op.startswith("chebyshev") else ORDER + 1)
    assert case.label == op_label(op, history, ORDER)
    benchmark(fn)
