# UniDiffuser-v1 with the TensorRT-LLM engine path. Base: NVIDIA's TensorRT-LLM release image,
# nvcr.io/nvidia/tensorrt-llm/release:<tensorrt_llm version> (TensorRT-LLM's
# docs/source/installation/containers.md, "Pre-built Images on NGC"), here the 1.2 release, 1.2.0
# (on NGC PyTorch 25.12: Python 3.12, CUDA 13.1, TensorRT 10.14, transformers 4.57.3).
# It has CUDA, nvcc, TensorRT (headers and libraries under /usr/local/tensorrt), PyTorch and
# tensorrt_llm.
#
# Why the tag is pinned to the 1.2 line: the engine path uses TensorRT-LLM's TensorRT-engine
# workflow (tensorrt_llm.builder, tensorrt_llm.functional/layers, tensorrt_llm.runtime.Session),
# which was deprecated after 1.2; later releases' main branch no longer has tensorrt_llm.builder.
# The build scripts and the trtllm backend check for it (unidiffuser/backends/engine_folder.py:
# TRTLLM_IMAGE names this tag; keep the two equal) and stop with one line naming this image.
# Engines also only load in the TensorRT version that built them (checked against config.json).
#
#   docker build -t unidiffuser-trt .
#   docker run --gpus all --rm -it -v $PWD/model:/workspace/unidiffuser/model unidiffuser-trt
ARG TRTLLM_TAG=1.2.0
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_TAG}

WORKDIR /workspace/unidiffuser
COPY . .

# Keep the image's Python packages: tensorrt_llm imports parts of transformers at import time and
# pins it (4.57.3), with its tokenizers, huggingface_hub, pillow, numpy<2, torch and tensorrt. The
# project also runs with those (CI runs the CPU suite under requirements-compat.txt). Every
# installed package is a constraint, so pip only adds what is missing and fails instead of
# up- or downgrading anything (ftfy and regex: the tokenizer's cleaning and word pattern; fastapi,
# uvicorn, python-multipart: serve.py, which the image's own OpenAI server already brings). openai-clip only ships CLIP's BPE file; its __init__
# (torchvision) is never imported.
RUN pip list --format=freeze | grep -E '^[A-Za-z0-9_.-]+==' > /tmp/image-packages.txt \
 && pip install --no-cache-dir -c /tmp/image-packages.txt safetensors tqdm pytest ftfy==6.1.1 regex \
        fastapi uvicorn python-multipart \
 && pip install --no-cache-dir --no-deps openai-clip==1.0.1

# The GroupNorm(+SiLU) library and TensorRT plugin: plugin/ -> plugin/build/libunidiffuser_plugins.so,
# for every GPU generation (see plugin/README.md). WITH_TENSORRT=ON: a TensorRT that CMake cannot
# find (it looks in /usr/local/tensorrt, TENSORRT_ROOT, /usr/include/<arch>-linux-gnu) fails the
# build here instead of producing a library without the TensorRT plugin.
RUN cmake -S plugin -B plugin/build -DCMAKE_BUILD_TYPE=Release -DWITH_TENSORRT=ON \
 && cmake --build plugin/build -j"$(nproc)"

ENV PYTHONPATH=/workspace/unidiffuser
CMD ["bash"]
