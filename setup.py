from setuptools import find_packages, setup

setup(
    name="kcache_dist",
    version="0.1.0",
    description="Tensor-parallel LLM serving with KCache attention: K cache in GPU memory, V cache in host memory",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kcache_dist", "kcache_dist.*"]),
    install_requires=[
        "torch>=2.5",
        "transformers>=4.56",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",  # reads the embedded default model's GGUF file once, to convert it
        "numpy",
        "deepspeed",
        "mpi4py",
        "nvidia-ml-py",
        "fastapi>=0.110",  # the OpenAI-compatible HTTP server (kcache_dist/server), the main job
        "uvicorn>=0.30",  # runs that server; >=0.30 for the signal hooks the graceful drain overrides
    ],
    extras_require={
        # accelerate: transformers' own GGUF loading, the reference in the conversion test;
        # mpich: an MPI runtime for mpi4py on machines without one.
        # openai, httpx: the server tests talk to a real server with the official client and raw HTTP;
        # hypothesis: property-based fuzzing of the HTTP API (tests/test_server_fuzz.py);
        # triton: the KCache kernels also run on CPU under TRITON_INTERPRET=1 (the version on the GPU image);
        # matplotlib: the benchmarks' PNG plots (tests/test_throughput_benchmark.py checks they are written).
        "test": ["pytest", "accelerate", "mpich", "openai>=1.0", "httpx", "hypothesis>=6.100",
                 "triton==3.6.0", "matplotlib"],
    },
)
