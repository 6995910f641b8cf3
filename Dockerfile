# UniDiffuser-v1 with the TensorRT-LLM engine path. Base: NVIDIA's TensorRT-LLM release image
# (tags nvcr.io/nvidia/tensorrt-llm/release:x.y.z, see the TensorRT-LLM docs, "Pre-built release
# container images on NGC"), which has CUDA, TensorRT (headers and libraries), PyTorch and tensorrt_llm.
#
#   docker build -t unidiffuser-trt .
#   docker run --gpus all --rm -it -v $PWD/model:/workspace/unidiffuser/model unidiffuser-trt
ARG TRTLLM_TAG=1.2.0
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_TAG}

WORKDIR /workspace/unidiffuser
COPY . .

# Python dependencies the base image does not carry. torch, numpy and tensorrt_llm come with it and
# are pinned to each other there: keep them. openai-clip only ships CLIP's BPE file; its __init__
# (torchvision) is never imported.
RUN grep -viE '^(torch|numpy|tensorrt)' requirements.txt > /tmp/req.txt \
 && pip install --no-cache-dir -r /tmp/req.txt pytest \
 && pip install --no-cache-dir --no-deps openai-clip==1.0.1

# The GroupNorm(+SiLU) TensorRT plugin: plugin/ -> plugin/build/libunidiffuser_plugins.so
# (TensorRT headers are in the image; CMake finds them under /usr/include/x86_64-linux-gnu or
# TENSORRT_ROOT).
RUN cmake -S plugin -B plugin/build -DCMAKE_BUILD_TYPE=Release \
 && cmake --build plugin/build -j"$(nproc)"

ENV PYTHONPATH=/workspace/unidiffuser
CMD ["bash"]
