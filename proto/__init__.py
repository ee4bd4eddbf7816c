"""Generated gRPC stubs: the public Open Inference Protocol and the internal worker service."""
