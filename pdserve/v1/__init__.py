"""Generated protobuf/gRPC stubs for package pdserve.v1 (scripts/gen_proto.sh; do not edit)."""
