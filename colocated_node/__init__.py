"""Colocated node (--role both): prefill and decode in one engine, no KV transfer."""
