"""Bytes of the tensors a caching library keeps beside a model: walk the Python objects reachable from a root (hook
registries, cache contexts, closures, controller state), skip the model's own parameters and buffers and anything
that is not cache state, and count each tensor storage once."""

from __future__ import annotations

import collections
import types
import weakref

import torch

_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, slice, torch.dtype, torch.device,
          torch.Size, types.ModuleType, type, types.BuiltinFunctionType)


def _storage(t: torch.Tensor):
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some wrappers)
        return None
    return (st.device.type, st.data_ptr()), st.nbytes()


def model_storages(*modules) -> set:
    """Storage keys of every parameter and buffer of the given modules (excluded from cache counts)."""
    keys = set()
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            s = _storage(t)
            if s is not None:
                keys.add(s[0])
    return keys


def tensor_storages(roots, *, stop=(), exclude: set = frozenset(), max_objects: int = 2_000_000) -> dict:
    """{storage key: bytes} of the tensors reachable from ``roots``.

    Follows instance dicts and slots, containers, bound methods, closures and ``nn.Module`` trees (the modules'
    parameters and buffers themselves are not followed); does not enter the objects in ``stop`` (compared by
    identity) and leaves out storages in ``exclude``.
    """
    stop_ids = {id(o) for o in stop}
    seen: set[int] = set()
    found: dict = {}
    todo = collections.deque(roots)
    while todo:
        o = todo.pop()
        if id(o) in seen or id(o) in stop_ids or isinstance(o, _ATOMS):
            continue
        seen.add(id(o))
        if len(seen) > max_objects:
            raise RuntimeError("tensor_storages: object graph too large to walk")
        if isinstance(o, torch.Tensor):
            s = _storage(o)
            if s is not None and s[0] not in exclude and s[1] > 0:
                found[s[0]] = max(found.get(s[0], 0), s[1])
            continue
        if isinstance(o, torch.nn.Module):
            d = vars(o)
            for k, v in d.items():
                if k in ("_parameters", "_buffers"):
                    continue
                todo.append(v)
            continue
        if isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
            continue
        if isinstance(o, (list, tuple, set, frozenset, collections.deque)):
            todo.extend(o)
            continue
        if isinstance(o, types.MethodType):
            todo.append(o.__self__)
            todo.append(o.__func__)
            continue
        if isinstance(o, types.FunctionType):
            for cell in o.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            todo.extend(o.__defaults__ or ())
            if o.__kwdefaults__:
                todo.append(o.__kwdefaults__)
            if hasattr(o, "__wrapped__"):
                todo.append(o.__wrapped__)
            continue
        if isinstance(o, (types.GeneratorType, types.CodeType, types.FrameType)):
            continue
        d = getattr(o, "__dict__", None)
        if isinstance(d, dict):
            todo.append(d)
        for cls in type(o).__mro__:
            for name in getattr(cls, "__slots__", ()) or ():
                if isinstance(name, str) and name not in ("__dict__", "__weakref__"):
                    try:
                        todo.append(getattr(o, name))
                    except AttributeError:
                        pass
        if isinstance(o, weakref.ref):
            target = o()
            if target is not None:
                todo.append(target)
    return found


def cache_bytes(roots, *, stop=(), exclude: set = frozenset()) -> int:
    """Total bytes of ``tensor_storages``."""
    return sum(tensor_storages(roots, stop=stop, exclude=exclude).values())
