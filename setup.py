"""Packaging for pebr-mega.

`kernels/` is installed as `pebr_mega.kernels` through the committed link `pebr_mega/kernels -> ../kernels`.
It has no `__init__.py` on purpose: Python runs in the checkout with the checkout on `sys.path` (`python -m
pytest`, `python -c`, a notebook), and transformers imports Hugging Face's `kernels` distribution; a regular
package anywhere on the path outranks a folder without `__init__.py` (PEP 420), so `import kernels` finds the
distribution while `pebr_mega.kernels.ops` is ours.

Version windows: each library whose internals the project leans on is bounded below by the oldest release the
code was read against or run on, and above by the first release nobody has tested (the README's "Versions"
table says which release ran where). `pebr_mega/versions.py` reads these windows back from the installed
metadata: the test log prints the resolved versions, and start-up refuses a GPU backend outside its window.
"""
from setuptools import find_packages, setup

CORE = [
    # torch: 2.13 in CI (CPU), 2.11 on the lent H100; SGLang pins torch exactly (0.5.13: 2.11, 0.5.23: 2.14.1).
    "torch>=2.11,<2.16",
    # transformers: the Qwen2.5-VL modelling and processing code the conversion and the HF engine use. 5.25 in
    # CI and the whole suite at 5.19.0, the release SGLang 0.5.23 pins exactly; 5.8.1 (SGLang 0.5.13's pin)
    # fails it (AutoImageProcessor needs torchvision there, and the rope-index and vision references differ).
    "transformers>=5.19,<6",
    # megatron-core: 0.16.1 in CI (the newest for Python 3.11), 0.19 read for Python 3.12 machines.
    "megatron-core>=0.16,<0.20",
    # triton: 3.9 in CI (interpreter), 3.6 on the lent H100.
    "triton>=3.6,<4",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "pillow>=10.0",
    "numpy>=1.26",
    "omegaconf>=2.3",
    "pyyaml>=6.0",
    "jinja2>=3.1",  # prompt templates (data.format_prompt)
    # MathRuler imports pylatexenc and sympy without declaring them.
    "mathruler>=0.1.0",
    "pylatexenc>=2.10",
    "sympy>=1.12",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "wandb>=0.18",
    # Megatron's async checkpoint writer needs psutil; einops is used by megatron-core's vision code.
    "psutil>=5.9",
    "einops>=0.7",
]

# DALI ships one wheel per CUDA major and every one of them installs the same `nvidia/dali` package, so two
# of them in one environment overwrite each other. Exactly one extra names a DALI wheel, chosen by the user
# for the machine's CUDA (README, "Installing the GPU backends"); `gpu` and `test` name none.
# tests/test_packaging.py checks this and every install command the docs and CI give.
EXTRAS = {
    "gpu": [
        # Transformer Engine: only through Megatron-Core's TE layer spec; megatron-core 0.16.1's own `dev` extra
        # (the TE releases NVIDIA tests it with) is >=2.9,<2.12. 0.19 gates newer TE features by version.
        "transformer-engine[pytorch]>=2.9,<2.12",
        # SGLang (docs/ROLLOUT.md, "SGLang version window"). It pins torch and transformers exactly, so its window
        # is bounded by the core windows above: 0.5.13-0.5.14 pin transformers 5.8.1 and 0.5.15-0.5.21 pin 5.12.1,
        # on which this suite fails (AutoImageProcessor there needs torchvision; the rope-index and vision
        # references differ); 0.5.22 and 0.5.23 pin torch 2.14.1 and transformers 5.19.0, the oldest transformers
        # the whole suite passed on. Below 0.5.13 it would also be wrong: 0.5.1-0.5.12 pass
        # `getattr(ret, "image_grid_thw", None)` = None to M-RoPE when no raw image came (text positions,
        # silently; multimodal/processors/qwen_vl.py `process_mm_data_async`). 0.5.23 is the newest release read
        # (its `Engine.begin_weight_update`/`end_weight_update` session is used). tests/rollout/test_sglang_contract.py
        # checks both ends against the wheels' source and their pins against the core windows.
        "sglang>=0.5.22,<0.5.24",
    ],
    # flash-attn 2 (optional: without it the `torch` spec uses torch's varlen_attn): `flash_attn_varlen_func`'s
    # positional layout (flash_attn/flash_attn_interface.py) is the same from 2.6 to 2.8.3; 3.x is another
    # interface (Hopper's flash_attn_interface). Its own extra because it compiles against the torch already
    # installed, which needs `pip install --no-build-isolation -e ".[flash-attn]"` (an extra cannot pass the flag).
    "flash-attn": ["flash-attn>=2.6,<2.9"],
    # DALI: `fn.decoders.image`, `fn.resize`, `pipeline_def`; 2.4.0 runs CI's CPU tests of DALI.
    "dali-cuda120": ["nvidia-dali-cuda120>=1.50,<2.5"],  # CUDA 12 drivers; also CI's CPU tests of DALI
    "dali-cuda130": ["nvidia-dali-cuda130>=1.50,<2.5"],  # CUDA 13 drivers
    # FG-CLIP (the CLIP reward's checkpoint upstream) ships modelling code that imports torchvision.ops; install
    # the torchvision build that matches your torch.
    "clip": ["torchvision>=0.19"],
    # TensorBoard event files beside wandb (logging.tensorboard); the tests read them back with its reader.
    "tensorboard": ["tensorboard>=2.14"],
    # Parquet GRPO files (EasyR1's layouts, `datasets`' exports).
    "parquet": ["pyarrow>=15"],
    "test": ["pytest>=8.0", "pytest-timeout>=2.3", "import-linter>=2.1", "tensorboard>=2.14", "pyarrow>=15"],
}

packages = find_packages(include=["pebr_mega", "pebr_mega.*"]) + ["pebr_mega.kernels"]

setup(
    name="pebr-mega",
    version="0.1.0",
    description="Megatron-scale trainer for the PeBR-R1 recipe (Perception Before Reasoning) on Qwen2.5-VL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_data={"pebr_mega": ["configs/*.yaml", "templates/*.jinja"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["pebr=pebr_mega.cli:main"]},
)
