"""The shared inference engine: Llama-family models on tensor-parallel layers, a
paged KV cache with a block manager, a continuous-batching scheduler and a sampler.
LLMEngine (llm_engine.py) is the entry point; README.md maps the files."""
