"""TensorRT-LLM engine networks, one per PyTorch reference module in `models/`.

Each file mirrors its reference one to one (same classes, same submodule names), so the
TensorRT-LLM checkpoint (`unidiffuser/trtllm_checkpoint.py`) is the converted state dict
name for name. The modules import `tensorrt_llm` at module level: import them only where
TensorRT-LLM is installed (the Docker image, see docs/engines.md). This package's
`__init__` stays import-free so that `models.trtllm` can be named on any machine.

API sources (NVIDIA/TensorRT-LLM, read for this code):
  tensorrt_llm/module.py            Module, ModuleList
  tensorrt_llm/parameter.py         Parameter(value, shape, dtype), .value
  tensorrt_llm/layers/linear.py     Linear(in_features, out_features, bias, dtype)
  tensorrt_llm/layers/conv.py       Conv2d(in, out, kernel_size, stride, padding, ..., dtype)
  tensorrt_llm/layers/embedding.py  Embedding(num_embeddings, embedding_dim, dtype)
  tensorrt_llm/functional.py        Tensor, concat, slice, split, view, permute, expand,
                                    unsqueeze, shape, constant, cast, matmul, softmax,
                                    layer_norm, group_norm, interpolate, bert_attention,
                                    activation, quick_gelu, sigmoid, cos, sin, _create_tensor
  tensorrt_llm/models/dit/model.py  how a diffusion transformer uses the above
"""
