"""The cuda-ipc KV transport: nodes on one host. The decode node's ranks export their KV
pools once per pairing (CUDA IPC handles as protobuf bytes); the prefill node's ranks
open them and copy each layer of a prompt straight into the reserved blocks on a side
stream, behind the forward's layer events. Only small control messages go over ZeroMQ.

    config.py     IpcConfig                     backend.py   what the registry hands out
    manager.py    IpcKVManager: pairing (host check), grants, control messages
    sender.py     IpcKVSender                   receiver.py  IpcKVReceiver, IpcInbox
    export.py     host id; a pool exported and opened (CUDA IPC, or host shared memory)
    copier.py     the copy layer: block runs, copies and checksums of one layer
    connector.py  IpcConnector: the engine's KV connector worker on every TP rank

On CPU the same protocol runs over host shared memory (export.py), which is what CI tests."""
