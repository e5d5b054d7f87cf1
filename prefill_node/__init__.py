"""Prefill node: batches prompts, computes each prompt's KV and first token, ships
the KV into the blocks a decode node reserved (the ticket), and frees its own copy
once the decode side acknowledged it.

    Prefill(request, ticket) -> queued -> prefilled (first token, KV exported)
        -> KV sent layer group by layer group -> acked: respond | failed: UNAVAILABLE
    The wait for the ack is bounded by the call's deadline, not the lease; a call
    cancelled at any point aborts its sequence and fails (NCCL: withdraws) its sender."""
