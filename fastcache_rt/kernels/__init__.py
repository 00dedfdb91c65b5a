"""``fastcache_rt.kernels``: the Triton kernels (``band_l1``, ``chebyshev``, ``taylor``, ``error_sums``,
``launch``).

Their source is the repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose: a folder
with one would be a regular package named ``kernels`` whenever Python runs with the repository root on
``sys.path`` (``python -m pytest``, ``python -c`` there), and would shadow the installed ``kernels`` distribution
that diffusers imports. A wheel copies the modules next to this file (``setup.py``'s ``build_py``); in a source
checkout or an editable install this package's path is extended to the folder instead.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
if not (_here / "launch.py").is_file():  # a source checkout: the modules are in <repo>/kernels
    _src = _here.parent.parent / "kernels"
    if (_src / "launch.py").is_file() and not (_src / "__init__.py").exists():
        __path__.append(str(_src))  # noqa: F821 (a package's module global)
