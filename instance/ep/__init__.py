"""Expert parallelism inside one instance: the leader keeps attention, KV and the scheduler; routed experts
live on expert workers. placement (pure planner) -> dispatch (the per-layer data path) -> worker (what an
expert worker holds and computes) -> scaler (changing the placement while the instance serves)."""
