"""The fastinstructor package. kernels/ and export/ install as fastinstructor.kernels / fastinstructor.export."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (ROOT / "fastinstructor" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

setup(
    name="fastinstructor",
    version=version,
    description="Fast, exact INSTRUCTOR instruction-finetuned text embeddings on CPU and GPU",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastinstructor", "fastinstructor.backends", "fastinstructor.kernels", "fastinstructor.export"],
    # Never install generic top-level names such as `kernels` or `export` into site-packages.
    package_dir={"fastinstructor.kernels": "kernels", "fastinstructor.export": "export"},
    install_requires=[
        # torch is pinned by the Makefile's constraints on CPU machines (see constraints-cpu.txt): an unpinned
        # install would pull a multi-GB CUDA build.
        "torch>=2.4",
        "transformers>=4.48",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "safetensors>=0.4",
        "huggingface_hub>=0.26",
        "numpy>=1.24",
        "pyarrow>=14",  # Parquet in and out of the embed job, the project's main use
        "tqdm>=4.60",
        "filelock>=3.12",  # inter-process locks (output folders, the ONNX cache); huggingface_hub needs it too
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.20"],
        # onnxruntime-gpu replaces onnxruntime on CUDA machines: install one or the other, never both.
        "gpu": ["triton>=3.0", "onnxruntime-gpu>=1.20"],
        "server": ["starlette>=0.40", "uvicorn>=0.30", "prometheus-client>=0.20"],
        # fastinstructor bench's plot and baseline, and the micro-benchmarks in bench/.
        "bench": ["matplotlib>=3.7", "sentence-transformers>=3.0", "pytest-benchmark>=4"],
        # setuptools and wheel: the layout test builds the wheel without build isolation.
        "dev": [
            "pytest>=8",
            "sentence-transformers>=3.0",
            "ruff>=0.6",
            "setuptools>=70.1",
            "wheel",
            "triton>=3.0",  # the kernels' parity tests run in its interpreter on the CPU
            "httpx>=0.27",  # the server tests' client, and
            "openai>=1.0",  # the official client they check compatibility with
        ],
    },
    entry_points={"console_scripts": ["fastinstructor=fastinstructor.cli:main"]},
)
