from setuptools import setup

setup(
    name="fastlora",
    version="0.1.0",
    description="Fast, exact LoRA layers: fused Triton kernels, a C++ CPU path, loralib's API, PEFT's files",
    python_requires=">=3.10",
    packages=["fastlora", "fastlora.ops", "fastlora.kernels", "fastlora.csrc"],
    package_dir={"fastlora.kernels": "kernels", "fastlora.csrc": "csrc"},
    package_data={"fastlora.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "safetensors",
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": [
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
        ],
    },
)
