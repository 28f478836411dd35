"""megatron-btm: Branch-Train-Merge on Megatron-Core.

The fused mixing op (csrc/) is an optional extension: the package imports and works without it
(a pure-PyTorch reference is used), and `megatron_btm.ops.backend()` says which path is active.
Set BTM_NO_EXT=1 to skip building it.
"""
import os
import shutil

from setuptools import find_packages, setup


def _extensions():
    """C++/OpenMP CPU kernels always (when torch is importable); CUDA kernels only when a CUDA
    torch and nvcc are both present. Owned by the fused-op code in csrc/."""
    if os.environ.get("BTM_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpu_src = os.path.join("csrc", "mixing_cpu.cpp")
    if not os.path.exists(os.path.join(here, cpu_src)):
        return [], {}
    # -fno-trapping-math lets GCC if-convert the selects in the exp/log polynomials, so the AVX2
    # clones vectorise too (AVX-512 has masked ops and vectorises either way).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-std=c++20"]
    exts = [cpp_extension.CppExtension(
        "megatron_btm._mixing_cpu", [cpu_src], extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"])]
    cuda_srcs = [os.path.join("csrc", f) for f in ("mixing_cuda.cpp", "mixing_kernels.cu")]
    if (torch.version.cuda and shutil.which("nvcc")
            and all(os.path.exists(os.path.join(here, s)) for s in cuda_srcs)):
        exts.append(cpp_extension.CUDAExtension(
            "megatron_btm._mixing_cuda", cuda_srcs,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]}))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron-btm",
    version="0.1.0",
    description="Branch-Train-Merge (ELMForest) training on Megatron-Core",
    packages=find_packages(include=["megatron_btm", "megatron_btm.*"]),
    python_requires=">=3.11",  # datetime.UTC in forest/manifest.py
    install_requires=[
        "megatron-core>=0.16,<0.17", "psutil", "nltk", "pybind11", "wandb", "tensorboard",
        "tokenizers>=0.21", "pyyaml", "tqdm", "numpy", "matplotlib", "scikit-learn",
    ],
    extras_require={"hf": ["transformers"], "test": ["pytest"]},
    entry_points={"console_scripts": ["btm=megatron_btm.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
