"""The NCCL KV transport (gloo where there is no GPU): GPU to GPU, one 2-rank communicator
per (prefill rank, decode rank) pair, the data moved by the engine's ranks.

    config.py      NcclConfig                 backend.py   what the registry hands out
    manager.py     NcclKVManager: pair sets, control messages over the base control channel
    pairs.py       which heads move over which pair; PairSet
    sender.py      NcclKVSender               receiver.py  NcclKVReceiver
    store.py       the pairs' rendezvous store, on a socket we bind
    connector.py   NcclConnector: the engine's KV connector worker on every TP rank
    rank.py        RankKV: one rank's data mover; rank_pairs.py, rank_cuda.py, rank_cpu.py,
                   streams.py, verify.py, buffers.py, state.py, trace.py hold its parts
    lib.py         NCCL through ctypes           kernels.py   fused gather/scatter + checksum (Triton)"""
