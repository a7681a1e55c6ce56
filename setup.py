from setuptools import find_packages, setup

setup(
    name="bigflax",
    version="0.1.0",
    description="Pretrain transformer language models with JAX/Flax, from a CPU to a TPU pod.",
    packages=find_packages(include=["bigflax", "bigflax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "grain==0.2.18",
        "array-record==0.8.6",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "numpy==2.4.6",
        "ml_collections==1.1.0",
        "absl-py==2.5.1",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
        "safetensors==0.8.0",  # Hugging Face checkpoints (bigflax.interop), read without torch
    ],
    extras_require={
        # libtpu lets `bigflax aot` compile for TPU topologies on any machine (and is what runs
        # TPUs on a TPU VM); the tests compile for a v5e slice, so they need it too.
        "tpu": ["libtpu==0.0.42.1"],
        # torch and transformers build the reference models of the HF parity tests. torch is
        # pinned exactly: its CPU wheel is on the build machines, while an unpinned torch pulls
        # several GB of CUDA wheels.
        "test": ["pytest==9.2.0", "portpicker==1.6.0", "libtpu==0.0.42.1", "torch==2.13.0",
                 "transformers==5.23.0"],
    },
    entry_points={"console_scripts": ["bigflax=bigflax.cli:main"]},
)
