# wrpo-nemo on an NGC PyTorch container: TransformerEngine, apex, NCCL, flash-attention and a CUDA build of torch
# inside; megatron-core 0.16.1 and this package on top.
#
#   docker build -t wrpo-nemo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v $PWD/runs:/workspace/wrpo-nemo/runs wrpo-nemo \
#       torchrun --nproc-per-node 8 recipes/wrpo.py --config-name wrpo_llama3_8b
#   enroot import -o wrpo-nemo.sqsh dockerd://wrpo-nemo      # the image Slurm's pyxis runs (scripts/slurm/)
#
# The base is pinned to one monthly release: 25.11 carries CUDA 13 and a TransformerEngine in the range
# megatron-core 0.16.1 is developed against (its dev extra asks for TE >= 2.9). Change BASE_IMAGE only to
# another fixed tag (or a digest), never to a floating one.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/wrpo-nemo
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The image's own torch (built for its CUDA) is kept: every pip call is constrained to the installed version,
# so no dependency can pull a PyPI torch over it. Dependencies first, in their own layer: editing the package
# does not reinstall them.
#
# PIP_CONSTRAINT: NGC PyTorch images set it to a file pinning their CUDA-built stack (torch, TransformerEngine,
# apex, flash-attn, numpy's ABI, ...). It is deliberately left in force (megatron's own Dockerfile clears it
# because it builds TE and apex itself; this image uses the container's builds): a dependency of ours that
# conflicts with those pins fails the build with pip's resolver error instead of replacing a CUDA build.
# pip applies it together with -c /opt/keep-torch.txt (our torch pin, which holds even in an image without the
# variable). The build log prints which constraint file was in force.
COPY pyproject.toml README.md ./
RUN echo "NGC pip constraints: ${PIP_CONSTRAINT:-none set}" \
 && python -c "import torch; print('torch==' + torch.__version__)" > /opt/keep-torch.txt \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/deps.txt \
 && pip install --no-cache-dir -c /opt/keep-torch.txt -r /tmp/deps.txt

COPY wrpo_nemo ./wrpo_nemo
RUN pip install --no-cache-dir --no-deps -c /opt/keep-torch.txt -e . \
 && python -c "import torch, megatron.core, wrpo_nemo; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
 && diff <(python -c "import torch; print('torch==' + torch.__version__)") /opt/keep-torch.txt \
 && command -v pkill

COPY recipes ./recipes
COPY conf ./conf
COPY scripts ./scripts

ENV OMP_NUM_THREADS=8 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PYTHONUNBUFFERED=1
# The NGC entry point (nvidia_entrypoint.sh) stays; this is its default command: the recipe's default config.
CMD ["python", "recipes/wrpo.py"]
