"""The protocol of PROTOCOL.md, one function per step, free of gRPC."""
