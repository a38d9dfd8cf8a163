"""Builds know_kernels._C (C++ CPU kernels) and, where nvcc exists, know_kernels._cuda,
with CMake + Ninja.  Neither links against torch: the Python wrappers pass raw pointers,
so one build serves any torch release.  No -march=native: kernels pick their instruction
set at run time.  Set KNOW_KERNELS_NO_EXT=1 to install the pure-Python package only."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("KNOW_KERNELS_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            "-GNinja",
        ]
        # Every option is passed on every build: the cache of an earlier build keeps
        # whatever it was given last, e.g. a KNOW_KERNELS_NO_CUDA=1 build's OFF.
        if os.environ.get("KNOW_KERNELS_NO_CUDA"):
            args.append("-DKNOW_WITH_CUDA=OFF")
        else:
            args.append("-DKNOW_WITH_CUDA=ON")
            if NVCC:
                args.append(f"-DCMAKE_CUDA_COMPILER={NVCC}")  # also when only CUDA_HOME names it
        subprocess.run(["cmake", str(ROOT / "csrc"), *args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--target", ext.target, "-j", jobs],
                       cwd=build_temp, check=True)


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate and candidate.is_file() else None


NVCC = _find_nvcc()

ext_modules = [] if os.environ.get("KNOW_KERNELS_NO_EXT") else [
    CMakeExtension("know_kernels._C", "_C"),
]
if ext_modules and NVCC and not os.environ.get("KNOW_KERNELS_NO_CUDA"):
    ext_modules.append(CMakeExtension("know_kernels._cuda", "_cuda"))

setup(
    name="know-kernels",
    version="0.1.0",
    description="Fused kernels for KNOW prediction (retrodiction of forgetting)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["know_kernels", "know_kernels.*"]),
    package_data={"know_kernels": ["weights/*.safetensors"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "h5py", "tqdm"],
    extras_require={
        "triton": ["triton>=3.4"],
        "data": ["scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib", "hypothesis"],
        # know_kernels.integrations; transformers' Trainer refuses to run without accelerate.
        "integrations": ["transformers>=4.46", "accelerate>=1.1.0", "lightning>=2.0"],
    },
    entry_points={"console_scripts": ["know=know_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
