"""Installs the `mindspeed_vita` framework and the `backends` hardware layer.

Dependency ranges are the ones this project is tested with. torch is not pinned to one
version here (NPU hosts need the torch that matches their torch_npu wheel); CPU hosts should
install `torch==2.13.0` first (see README), otherwise pip pulls the CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="mindspeed-vita",
    version="0.1.0",
    description="Train and serve Long-VITA-style long-context vision-language models on Ascend NPU, NVIDIA GPU and CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",
    packages=find_packages(include=["mindspeed_vita", "mindspeed_vita.*", "backends", "backends.*"]),
    include_package_data=True,
    # the demo's model config ships inside the package, so `mindspeed-vita demo` works from a
    # regular (non-editable) install too
    package_data={"mindspeed_vita": ["py.typed"], "mindspeed_vita.demo": ["*.yaml"]},
    install_requires=[
        "torch>=2.6,<2.14",
        "megatron-core>=0.12.1,<0.17",
        "transformers>=4.52,<6",
        "numpy>=1.26,<3",
        "pyyaml>=6.0,<7",
        "pydantic>=2.7,<3",
        "pillow>=10,<14",
        "av>=12,<20",
        "safetensors>=0.4,<0.9",
        "tokenizers>=0.19,<0.24",
        "psutil>=5.9,<8",  # megatron-core's dist_checkpointing.save imports it
        "tqdm>=4.66,<5",  # progress of slow work (mindspeed_vita/progress.py)
    ],
    extras_require={
        # torch_npu must match the installed torch exactly (torch_npu X.Y.Z[.postN] <-> torch X.Y.Z);
        # MindSpeed and its matching Megatron-LM come from their source repositories (README).
        "npu": ["torch_npu"],
        "gpu": ["flash-attn>=2.6"],
        # the OpenAI-compatible server (`mindspeed-vita serve`)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # TensorBoard event files of `train` (<save>/tensorboard); pinned: 2.20.0 needs no torch
        # or TensorFlow, about 55 MB with its dependencies (grpcio, protobuf)
        "tensorboard": ["tensorboard==2.20.0"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "scikit-image>=0.22", "ruff>=0.5,<1",
                "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.30", "tensorboard==2.20.0"],
        # evaluation through lmms-eval (docs/evaluation.md); the entry point below registers
        # the `mindspeed_vita` model with it
        # (lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed)
        "eval": ["lmms-eval>=0.7.3,<0.8", "filelock>=3.10,<4"],
    },
    entry_points={
        "console_scripts": ["mindspeed-vita=mindspeed_vita.cli:main"],
        "lmms_eval.models": ["mindspeed_vita=mindspeed_vita.eval.registration:manifest"],
    },
)
