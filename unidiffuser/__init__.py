"""UniDiffuser text-to-image: tokenizer, sampler, checkpoint conversion and the pipeline."""
