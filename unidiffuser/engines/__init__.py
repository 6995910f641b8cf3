"""Building TensorRT-LLM engines (build_*.py): the only code that imports tensorrt_llm.builder.

    args.py        the build scripts' arguments, checked before anything heavy is imported
    checkpoint.py  TensorRT-LLM checkpoint folders (MODEL/trtllm/<net>/) from the model folder
    build.py       checkpoint -> TensorRT-LLM network -> serialized engine -> engine folder
"""
