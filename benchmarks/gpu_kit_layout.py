"""The GPU kit's layout (benchmarks/gpu_kit.py, docs/gpu.md): where the kit's files lie, which
distributions it carries as wheels, which the GPU machine has already (the dry run's emulated site holds
only these), and what the run imports (preflight imports each).

gpu_kit.py, gpu_kit_files and gpu_kit_preflight import these names from here; this module imports none
of the kit's, so no import cycle forms. Standard library only.
"""

from __future__ import annotations

from pathlib import Path


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ROOT = Path(__file__).resolve().parents[1]
SUMS = "SHA256SUMS"
WEIGHTS_FILE = "weights/imgsim-0.1.2-resnet50-q10.npz"  # under the kit
DATA_DIR = "fashion-mnist"  # under the kit
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The wheels the kit carries: the distributions visrec's GPU run imports that the machine lacks, each at
# its constraints.txt pin (scripts/gpu_kit.sh downloads them).
KIT_DISTRIBUTIONS = (
    "annotated-types",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "python-dotenv",
    "typing-extensions",  # pydantic-core 2.50 needs >= 4.16; the machine's may be older
    "typing-inspection",
)
# The GPU machine's Python packages (the device tool's KINDS.md, read on 2026-11-17): the dry run's
# emulated site holds only these and the kit's, so an import the GPU machine would fail fails here too.
ON_GPU_MACHINE = _words(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
    httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
    mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
    nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
    opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
    pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp
    """
)
# What the run imports (preflight imports each: a missing one is one line, in seconds, not minutes in).
RUN_MODULES = (
    "numpy",
    "PIL",
    "torch",
    "torchvision",
    "pydantic",
    "pydantic_settings",
    "rich",
    "httpx",
    "visrec.config",
    "visrec.train",
    "visrec.embed",
    "visrec.ingest",
    "quality",
    "embed_throughput",
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
