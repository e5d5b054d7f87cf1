"""The wire: gRPC helpers, the protocol version and the conversions between
the wire's messages and ours. Stubs generated from proto/ live in pdserve.v1."""
