"""What every engine-running node shares: the engine loop, the coordinator agent
(register, heartbeat, renew), model info and the node config."""
