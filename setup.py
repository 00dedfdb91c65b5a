"""Build script: the C++ CPU kernels (``fastcache_rt._C``) and, when asked or when a GPU toolchain is
present, the CUDA kernels (``fastcache_rt._C_cuda``), both through CMake + ninja.

Environment:
  FASTCACHE_RT_CUDA   auto (default) | 1 | 0   -- build the CUDA module. ``auto`` builds it when ``nvcc`` is
                      found and a GPU is visible (``nvidia-smi`` lists one) or the importable torch is a CUDA build.
  FASTCACHE_RT_CUDA_ARCHS  CMake CUDA architectures, default "80;90".
  FASTCACHE_RT_BUILD_TYPE  CMake build type, default Release.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    flag = os.environ.get("FASTCACHE_RT_CUDA", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        return True
    if shutil.which("nvcc") is None:
        return False
    if shutil.which("nvidia-smi") is not None:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
            if "GPU" in out:
                return True
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch  # noqa: PLC0415 (only importable without build isolation)

        return torch.version.cuda is not None
    except ImportError:
        return False


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build produces every module (``_C``, and ``_C_cuda`` when asked); each declared extension then
    finds its file in the output directory."""

    _built_in: Path | None = None

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        if self._built_in is not None:
            return

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = _want_cuda()
        cfg = os.environ.get("FASTCACHE_RT_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DFASTCACHE_RT_CUDA={'ON' if cuda else 'OFF'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('FASTCACHE_RT_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        else:
            try:
                import ninja

                args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
            except ImportError:
                pass
        print(f"fastcache_rt: building C++ CPU kernels; CUDA kernels: {'yes' if cuda else 'no'}", flush=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_temp, check=True)
        self._built_in = extdir


class BuildPy(build_py):
    """The Triton kernels' modules (top-level ``kernels/``, deliberately not a package: see
    ``fastcache_rt/kernels/__init__.py``) are copied into the wheel's ``fastcache_rt/kernels/``."""

    def run(self) -> None:
        super().run()
        dest = Path(self.build_lib) / "fastcache_rt" / "kernels"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(src), str(dest / src.name))


setup(
    # every subpackage of fastcache_rt/ (policy, families, models, bench, kernels, ...); the Triton kernels' modules
    # come from the top-level kernels/ folder (BuildPy)
    packages=find_packages(include=["fastcache_rt", "fastcache_rt.*"]),
    # the shipped demo model (a diffusers pipeline folder: configs, tokenizers, safetensors weights)
    package_data={"fastcache_rt.models": ["default/*", "default/*/*"]},
    ext_modules=[CMakeExtension("fastcache_rt._C")] + ([CMakeExtension("fastcache_rt._C_cuda")] if _want_cuda() else []),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    zip_safe=False,
)
