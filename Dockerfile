# megatron-btm on an NGC PyTorch image: CUDA, NCCL, torch, apex and Transformer Engine come
# from the base (never from pip); we add Megatron-Core, our Python deps, and build csrc/
# (the fused mixing op: C++/OpenMP always, CUDA kernels because the base has nvcc).
#   docker build -t megatron-btm:0.1.0 .
#   enroot import dockerd://megatron-btm:0.1.0   # -> .sqsh for pyxis (plan: cluster.container_image)
#   docker run --gpus all megatron-btm:0.1.0 launch slurm /plans/run.yaml --dry-run
# The tag is pinned: Megatron-Core releases are tested against the previous month's NGC image.
FROM nvcr.io/nvidia/pytorch:25.11-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST="8.0 8.6 9.0" \
    MAX_JOBS=8

WORKDIR /opt/megatron-btm

# Dependencies first (a layer that survives source edits). The base's PIP_CONSTRAINT stays set,
# so pip cannot replace its torch/apex/TE; the CPU pins and test tools are dropped here.
COPY requirements.txt ./
RUN grep -vE '^(torch|pytest|pytest-timeout)([=<>~! ]|$)' requirements.txt > /tmp/requirements-gpu.txt \
 && pip install -r /tmp/requirements-gpu.txt \
 && rm /tmp/requirements-gpu.txt

# The package, with csrc/ built against the base's torch (no build isolation: use that torch).
COPY setup.py ./
COPY csrc ./csrc
COPY megatron_btm ./megatron_btm
COPY examples ./examples
RUN pip install --no-build-isolation --no-deps . \
 && python -c "import megatron.core, megatron_btm, megatron_btm.cli"

WORKDIR /workspace
ENTRYPOINT ["btm"]
CMD ["--help"]
