"""dpvl: differentially private pretraining of vision and vision-language models."""

from setuptools import find_packages, setup

setup(
    name="dpvl",
    version="0.1.0",
    description="Differentially private pretraining of vision and vision-language models in JAX.",
    packages=find_packages(include=["dpvl", "dpvl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6,<0.13",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "array-record>=0.5,<0.9",
        "etils[epath]>=1.5,<2",
        "cloudpickle>=3,<4",
        "msgpack>=1,<2",
        "sentencepiece>=0.2,<0.3",
        "ml-collections>=1.0,<2",
        "dp-accounting>=0.6.0,<0.7",
        "jax-privacy>=2.0,<3",  # its auditing statistics: dpvl.privacy.audit
        "einops>=0.8,<0.9",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "pillow>=10,<14",
        "absl-py>=2.1,<3",
        "tensorboardX>=2.6,<3",
        "matplotlib>=3.7,<4",  # python -m dpvl.report
        "tqdm>=4.60,<5",  # dpvl.progress
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "ruff==0.17.6"],  # ruff: tests/test_lint.py
        "tensorboard": ["tensorboard>=2.15,<3"],  # the viewer; runs write events without it
        # importlib-resources: TFDS prepares a dataset with it but declares it for Python < 3.9
        # only (tensorflow/datasets#11212).
        "tfds": ["tensorflow-datasets>=4.9,<5", "tensorflow-cpu>=2.15,<3",
                 "importlib-resources>=5.10,<8"],
        "gpu": ["jax[cuda12]>=0.6,<0.13"],
        # libtpu, pinned by jax[tpu] to the installed jax: TPU runs, and --mode=compile
        # --topology=v5e-256 (the TPU compiler) from any host.
        "tpu": ["jax[tpu]>=0.6,<0.13"],
    },
)
