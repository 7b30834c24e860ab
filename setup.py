"""Build of shapcam_ext's compiled ops library, shapcam_ext._C; the metadata is in pyproject.toml.

The CPU kernels are always built. The CUDA kernels are built whenever nvcc and a CUDA build of
torch are present, with or without a GPU; SHAPCAM_NO_CUDA=1 builds the CPU kernels only.
DEBUG=1 builds without optimisation and with debug symbols; MAX_JOBS bounds ninja's parallelism.

What depends on the torch found at build time is set here: the version's local tag (+cpu,
+cu130), the torch requirement (the release the library is compiled against: its C++ ABI is
not stable across releases) and shapcam_ext/_build_info.py, which lets the package say what it
was built for when it cannot load.
"""
import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cuda_toolkit import cuda_toolkit  # noqa: E402

CUDA_ROOT = None if os.environ.get("SHAPCAM_NO_CUDA", "0") == "1" else cuda_toolkit()
if CUDA_ROOT is not None:
    # torch.utils.cpp_extension reads both when it is imported. No GPU is needed to compile.
    os.environ["CUDA_HOME"] = CUDA_ROOT
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

USE_CUDA = CUDA_ROOT is not None and torch.version.cuda is not None
DEBUG = os.environ.get("DEBUG", "0") == "1"
TORCH_RELEASE = torch.__version__.split("+")[0]
LOCAL_TAG = "cu" + torch.version.cuda.replace(".", "") if USE_CUDA else "cpu"
# A source distribution builds against whatever torch it meets: no local tag, no torch pin.
SOURCE_ONLY = "sdist" in sys.argv


def base_version() -> str:
    with open(os.path.join(ROOT, "shapcam_ext", "__init__.py")) as f:
        return re.search(r'^__version__ = "(.+)"$', f.read(), re.MULTILINE).group(1)


def write_build_info() -> None:
    """shapcam_ext/_build_info.py: what this build is for (not under version control)."""
    with open(os.path.join(ROOT, "shapcam_ext", "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py: what this build of shapcam_ext was compiled for."""\n'
                f'VERSION = "{base_version()}+{LOCAL_TAG}"\n'
                f'TORCH_VERSION = "{torch.__version__}"\n'
                f"CUDA = {torch.version.cuda if USE_CUDA else None!r}\n")


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # OpenMP as torch itself is built: at::parallel_for is inlined into our kernels. -g0 drops
    # the debug info Python's default flags ask for, a third of the C++ compile time.
    optimise = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    compile_args = {"cxx": optimise + ["-fopenmp"]}
    if USE_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        compile_args["nvcc"] = ["-O0", "-g", "-G"] if DEBUG else ["-O3"]
    make = CUDAExtension if USE_CUDA else CppExtension
    return make("shapcam_ext._C", sources, extra_compile_args=compile_args, extra_link_args=["-fopenmp"])


if not SOURCE_ONLY:
    write_build_info()
print(f"shapcam_ext: building the {'CPU and CUDA' if USE_CUDA else 'CPU'} kernels against torch {torch.__version__}"
      + (" (debug)" if DEBUG else ""))
setup(
    version=base_version() if SOURCE_ONLY else f"{base_version()}+{LOCAL_TAG}",
    install_requires=["numpy>=1.24", "tqdm>=4.60", "torch" if SOURCE_ONLY else f"torch=={TORCH_RELEASE}"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
