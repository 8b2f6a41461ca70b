from setuptools import setup

# The versions fastlora is tested on: torch 2.11 + Triton 3.6 (the GPU image) and the newest
# releases (CI); tests/test_packaging.py checks that the installed ones lie in these ranges.
TORCH = "torch>=2.11"
TRITON = "triton>=3.6; platform_system == 'Linux'"
BITSANDBYTES = "bitsandbytes>=0.48"

setup(
    name="fastlora",
    version="0.1.0",
    description="Fast, exact LoRA layers: fused Triton kernels, a C++ CPU path, loralib's API, PEFT's files",
    python_requires=">=3.10",
    packages=["fastlora", "fastlora.ops", "fastlora.kernels", "fastlora.csrc"],
    package_dir={"fastlora.kernels": "kernels", "fastlora.csrc": "csrc"},
    package_data={"fastlora.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        TORCH,
        "numpy",
        "safetensors",
        TRITON,
    ],
    extras_require={
        # QLoRA: LoRA on bitsandbytes 4-bit (NF4 / FP4) base layers
        "qlora": [BITSANDBYTES],
        "dev": [
            BITSANDBYTES,
            "pytest",
            "pytest-benchmark",
            "loralib",
            "peft",
            "transformers",
            "accelerate",
            "scikit-learn",
            "matplotlib",
            "tqdm",
            "ninja",
            "packaging",
        ],
    },
)
