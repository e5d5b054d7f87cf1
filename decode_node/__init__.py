"""Decode node: reserves KV blocks for a request, receives its KV from a prefill
node into exactly those blocks, then decodes it in the continuous batch and
streams one columnar TokenBatch per engine step to the coordinator (built and
detokenized on the event loop, off the engine's thread: outputs.py).

    Reserve -> (KV layers arrive, verified) -> admitted -> decoding -> finished
            \\-> lease expired / bad KV / aborted: blocks freed, error update sent
    Reservations and running requests of an epoch are aborted when the node registers
    anew or the last Subscribe stream of that epoch ends (nobody to stream to)."""
