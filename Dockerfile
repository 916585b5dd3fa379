# Production image: slimdiff-export with TensorRT on an NVIDIA PyTorch base (CUDA torch, TensorRT libraries,
# and the C++ toolchain AOTInductor compiles with).
#
#   docker build -t slimdiff .
#   docker run --gpus all -v "$PWD:/work" slimdiff --model /work/my-sd15 --engine trt --out /work/engines
#
# Engines are tied to the TensorRT version and GPU they were built on: build them on the machine (or the same
# GPU model and image) that serves them.
ARG BASE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE}

# The base pins its own package set through PIP_CONSTRAINT; clearing it lets pip resolve slimdiff's
# requirements (the base's CUDA torch already satisfies torch>=2.4 and is kept).
ENV PIP_CONSTRAINT= \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/slimdiff
COPY pyproject.toml README.md ./
COPY slimdiff ./slimdiff
# The trt extra brings tensorrt>=10.14 (native ONNX Attention), polygraphy and cuda-python. The check reads
# package metadata only: importing tensorrt needs the GPU driver, which `docker build` does not have.
RUN pip install ".[trt]" \
 && python -c "import importlib.metadata as m; print('tensorrt', m.version('tensorrt'))" \
 && slimdiff-export --help > /dev/null

WORKDIR /work
ENTRYPOINT ["slimdiff-export"]
CMD ["--help"]
