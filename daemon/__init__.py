"""The privileged supervisor: config, trust policy, workers, the public gRPC API."""
