"""Generated gRPC stubs: the public Open Inference Protocol and the internal worker service."""


def message_options(limit: int) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the 4 MB default message size to `limit` (every hop uses this)."""
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
