"""The shared inference engine: Llama-family models on tensor-parallel layers, a
paged KV cache with a block manager, a continuous-batching scheduler and a sampler.

    llm_engine.py      LLMEngine, the entry point: requests in, tokens out, one step at a time
    engine_loop.py     an LLMEngine on its own thread, for servers
    config.py          EngineConfig          sequence.py   one request inside the engine
    scheduler.py       continuous batching   block_manager.py   KV blocks with reference counts
    executor.py        runs the model on every TP rank; worker.py is a rank other than 0
    model_runner.py    one rank: weights, KV pool, step inputs, CUDA graphs
    model.py, layers.py, rope.py, parallel.py    the decoder, its TP layers, RoPE, the TP group
    attention.py       paged attention in torch; triton_attention.py, triton_ops.py its CUDA kernels
    kv_cache.py        a rank's KV pool     step_inputs.py   a CUDA step's inputs in one buffer
    cuda_graphs.py     decode graphs        prefill_graphs.py   graphs for steps with prompt tokens
    sampler.py, detokenizer.py, loader.py   sampling, streamed text, model files and weights"""
