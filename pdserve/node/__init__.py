"""What every engine-running node shares: the engine loop, the coordinator agent
(register, heartbeat, renew), model info, the node config and its Prometheus metrics."""
