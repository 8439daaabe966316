"""Live migration of running requests with their KV cache: protocol, source and destination halves, transports."""
