"""pagehaul receiver: accepts migration sessions over gRPC and writes CRIU image directories."""
