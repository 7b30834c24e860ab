"""Build of shapcam_ext and its compiled ops library, shapcam_ext._C.

The CPU kernels are always built. The CUDA kernels are built whenever nvcc and a CUDA build of
torch are present, with or without a GPU; SHAPCAM_NO_CUDA=1 builds the CPU kernels only.
Install with `pip install --no-build-isolation -e .` (MAX_JOBS=2 bounds ninja's parallelism).
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_toolkit():
    """Root of the CUDA toolkit that `nvcc` runs, or None without nvcc.

    nvcc on PATH may be a wrapper script elsewhere; torch would guess CUDA_HOME from the
    wrapper's location and fail to link cudart. `nvcc --dryrun` prints the real root as TOP.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(nvcc))


CUDA_ROOT = None if os.environ.get("SHAPCAM_NO_CUDA", "0") == "1" else cuda_toolkit()
if CUDA_ROOT is not None:
    # torch.utils.cpp_extension reads both when it is imported. No GPU is needed to compile.
    os.environ["CUDA_HOME"] = CUDA_ROOT
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

USE_CUDA = CUDA_ROOT is not None and torch.version.cuda is not None


def version():
    with open(os.path.join(ROOT, "shapcam_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "(.+)"$', f.read(), re.MULTILINE).group(1)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # OpenMP as torch itself is built: at::parallel_for is inlined into our kernels. -g0 drops
    # the debug info Python's default flags ask for, a third of the C++ compile time.
    compile_args = {"cxx": ["-O3", "-g0", "-fopenmp"]}
    if USE_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        compile_args["nvcc"] = ["-O3"]
    make = CUDAExtension if USE_CUDA else CppExtension
    return make("shapcam_ext._C", sources, extra_compile_args=compile_args, extra_link_args=["-fopenmp"])


print(f"shapcam_ext: building the {'CPU and CUDA' if USE_CUDA else 'CPU'} kernels")
setup(
    name="shapcam_ext",
    version=version(),
    description="Shap-CAM saliency maps with compiled masking and Shapley accumulation ops",
    packages=find_packages(include=["shapcam_ext*"]),
    python_requires=">=3.10",
    # torch is deliberately not listed: the build links against the torch already installed
    # (pinned in constraints.txt), and a resolver must not swap it for another build.
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["shapcam = shapcam_ext.cli:main"]},
)
