# wrpo-nemo on an NGC PyTorch container (TransformerEngine, apex, NCCL and flash-attention inside).
#
#   docker build -t wrpo-nemo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v $PWD/runs:/workspace/wrpo-nemo/runs wrpo-nemo \
#       torchrun --nproc-per-node 8 recipes/wrpo.py --config-name wrpo_llama3_8b
#
# The image's own torch (built for its CUDA) is kept: pip is constrained to the installed version.
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/wrpo-nemo
COPY pyproject.toml README.md ./
COPY wrpo_nemo ./wrpo_nemo
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/keep-torch.txt \
 && pip install --no-cache-dir -c /tmp/keep-torch.txt megatron-core==0.16.1 -e . \
 && python -c "import torch, megatron.core, wrpo_nemo; print(torch.__version__, megatron.core.__version__)"
COPY recipes ./recipes
COPY conf ./conf
COPY scripts ./scripts

ENV OMP_NUM_THREADS=8
CMD ["python", "recipes/wrpo.py"]
