"""A KV backend that completes at once inside one process (config.py, manager.py,
backend.py): the prefill node's sender copies the KV straight into the decode node's
receiver. For tests of node logic that do not test a transport."""
