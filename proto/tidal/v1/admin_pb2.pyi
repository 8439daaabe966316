from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_ROLE_UNSPECIFIED: _ClassVar[InstanceRole]
    INSTANCE_ROLE_BOTH: _ClassVar[InstanceRole]
    INSTANCE_ROLE_PREFILL: _ClassVar[InstanceRole]
    INSTANCE_ROLE_DECODE: _ClassVar[InstanceRole]

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_STARTING: _ClassVar[InstanceState]
    INSTANCE_STATE_SERVING: _ClassVar[InstanceState]
    INSTANCE_STATE_DRAINING: _ClassVar[InstanceState]
    INSTANCE_STATE_DEAD: _ClassVar[InstanceState]

class MigrationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_STATE_UNSPECIFIED: _ClassVar[MigrationState]
    MIGRATION_STATE_PENDING: _ClassVar[MigrationState]
    MIGRATION_STATE_COPYING: _ClassVar[MigrationState]
    MIGRATION_STATE_LAST_STAGE: _ClassVar[MigrationState]
    MIGRATION_STATE_COMMITTED: _ClassVar[MigrationState]
    MIGRATION_STATE_ABORTED_SRC: _ClassVar[MigrationState]
    MIGRATION_STATE_ABORTED_DST: _ClassVar[MigrationState]
    MIGRATION_STATE_ENDED: _ClassVar[MigrationState]
INSTANCE_ROLE_UNSPECIFIED: InstanceRole
INSTANCE_ROLE_BOTH: InstanceRole
INSTANCE_ROLE_PREFILL: InstanceRole
INSTANCE_ROLE_DECODE: InstanceRole
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_STARTING: InstanceState
INSTANCE_STATE_SERVING: InstanceState
INSTANCE_STATE_DRAINING: InstanceState
INSTANCE_STATE_DEAD: InstanceState
MIGRATION_STATE_UNSPECIFIED: MigrationState
MIGRATION_STATE_PENDING: MigrationState
MIGRATION_STATE_COPYING: MigrationState
MIGRATION_STATE_LAST_STAGE: MigrationState
MIGRATION_STATE_COMMITTED: MigrationState
MIGRATION_STATE_ABORTED_SRC: MigrationState
MIGRATION_STATE_ABORTED_DST: MigrationState
MIGRATION_STATE_ENDED: MigrationState

class InstanceLoad(_message.Message):
    __slots__ = ("total_blocks", "free_blocks", "used_blocks", "reserved_blocks", "block_size", "num_running", "num_waiting", "num_preempted", "num_suspended", "head_demand_blocks", "waiting_demand_blocks", "running_tokens", "step_time_ms", "tokens_per_s", "num_preemptions_total", "num_high_priority", "head_wait_s", "remaining_output_tokens", "cached_blocks", "prefix_hit_tokens", "prefix_query_tokens", "prefill_backlog_tokens")
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    NUM_SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    HEAD_DEMAND_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WAITING_DEMAND_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_HIGH_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    HEAD_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    REMAINING_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_BACKLOG_TOKENS_FIELD_NUMBER: _ClassVar[int]
    total_blocks: int
    free_blocks: int
    used_blocks: int
    reserved_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preempted: int
    num_suspended: int
    head_demand_blocks: int
    waiting_demand_blocks: int
    running_tokens: int
    step_time_ms: float
    tokens_per_s: float
    num_preemptions_total: int
    num_high_priority: int
    head_wait_s: float
    remaining_output_tokens: int
    cached_blocks: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    prefill_backlog_tokens: int
    def __init__(self, total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., used_blocks: _Optional[int] = ..., reserved_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_preempted: _Optional[int] = ..., num_suspended: _Optional[int] = ..., head_demand_blocks: _Optional[int] = ..., waiting_demand_blocks: _Optional[int] = ..., running_tokens: _Optional[int] = ..., step_time_ms: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., num_preemptions_total: _Optional[int] = ..., num_high_priority: _Optional[int] = ..., head_wait_s: _Optional[float] = ..., remaining_output_tokens: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., prefix_hit_tokens: _Optional[int] = ..., prefix_query_tokens: _Optional[int] = ..., prefill_backlog_tokens: _Optional[int] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "node_id", "node_ip", "state", "model", "load", "load_age_s", "role", "experts")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    node_id: str
    node_ip: str
    state: InstanceState
    model: str
    load: InstanceLoad
    load_age_s: float
    role: InstanceRole
    experts: ExpertParallel
    def __init__(self, instance_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_ip: _Optional[str] = ..., state: _Optional[_Union[InstanceState, str]] = ..., model: _Optional[str] = ..., load: _Optional[_Union[InstanceLoad, _Mapping]] = ..., load_age_s: _Optional[float] = ..., role: _Optional[_Union[InstanceRole, str]] = ..., experts: _Optional[_Union[ExpertParallel, _Mapping]] = ...) -> None: ...

class ExpertRank(_message.Message):
    __slots__ = ("rank", "experts", "load_share", "pid", "layers")
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_SHARE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    rank: str
    experts: int
    load_share: float
    pid: int
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[str] = ..., experts: _Optional[int] = ..., load_share: _Optional[float] = ..., pid: _Optional[int] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class ExpertParallel(_message.Message):
    __slots__ = ("ep_size", "target", "max_size", "ranks", "warm_workers", "scaling", "last_scale", "remote_ms_per_layer", "workers_lost", "warm_pids")
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    WARM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    LAST_SCALE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_MS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    WORKERS_LOST_FIELD_NUMBER: _ClassVar[int]
    WARM_PIDS_FIELD_NUMBER: _ClassVar[int]
    ep_size: int
    target: int
    max_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[ExpertRank]
    warm_workers: int
    scaling: str
    last_scale: str
    remote_ms_per_layer: float
    workers_lost: int
    warm_pids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ep_size: _Optional[int] = ..., target: _Optional[int] = ..., max_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[ExpertRank, _Mapping]]] = ..., warm_workers: _Optional[int] = ..., scaling: _Optional[str] = ..., last_scale: _Optional[str] = ..., remote_ms_per_layer: _Optional[float] = ..., workers_lost: _Optional[int] = ..., warm_pids: _Optional[_Iterable[int]] = ...) -> None: ...

class ScaleExpertsRequest(_message.Message):
    __slots__ = ("instance_id", "ep_size", "dry_run")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    ep_size: int
    dry_run: bool
    def __init__(self, instance_id: _Optional[str] = ..., ep_size: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ExpertMove(_message.Message):
    __slots__ = ("layer", "expert", "src", "dst")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    src: str
    dst: str
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ...) -> None: ...

class ScaleExpertsResponse(_message.Message):
    __slots__ = ("instance_id", "previous", "ep_size", "result", "ok", "moves", "bytes_moved", "prepare_ms", "transfer_ms", "switch_ms", "total_ms", "ranks")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    PREPARE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    SWITCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    previous: int
    ep_size: int
    result: str
    ok: bool
    moves: _containers.RepeatedCompositeFieldContainer[ExpertMove]
    bytes_moved: int
    prepare_ms: float
    transfer_ms: float
    switch_ms: float
    total_ms: float
    ranks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., previous: _Optional[int] = ..., ep_size: _Optional[int] = ..., result: _Optional[str] = ..., ok: _Optional[bool] = ..., moves: _Optional[_Iterable[_Union[ExpertMove, _Mapping]]] = ..., bytes_moved: _Optional[int] = ..., prepare_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., switch_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., ranks: _Optional[_Iterable[str]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances", "control_plane")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PLANE_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    control_plane: ControlPlane
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., control_plane: _Optional[_Union[ControlPlane, _Mapping]] = ...) -> None: ...

class ControlPlane(_message.Message):
    __slots__ = ("scheduler_reachable", "scheduler_silent_s", "state_store", "state_store_reachable", "state_store_error", "unwritten_intent", "autoscale", "target_instances", "scaling", "last_scale_decision", "last_scale_age_s")
    SCHEDULER_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_SILENT_S_FIELD_NUMBER: _ClassVar[int]
    STATE_STORE_FIELD_NUMBER: _ClassVar[int]
    STATE_STORE_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    STATE_STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    UNWRITTEN_INTENT_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    TARGET_INSTANCES_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    LAST_SCALE_DECISION_FIELD_NUMBER: _ClassVar[int]
    LAST_SCALE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    scheduler_reachable: bool
    scheduler_silent_s: float
    state_store: str
    state_store_reachable: bool
    state_store_error: str
    unwritten_intent: int
    autoscale: bool
    target_instances: int
    scaling: str
    last_scale_decision: str
    last_scale_age_s: float
    def __init__(self, scheduler_reachable: _Optional[bool] = ..., scheduler_silent_s: _Optional[float] = ..., state_store: _Optional[str] = ..., state_store_reachable: _Optional[bool] = ..., state_store_error: _Optional[str] = ..., unwritten_intent: _Optional[int] = ..., autoscale: _Optional[bool] = ..., target_instances: _Optional[int] = ..., scaling: _Optional[str] = ..., last_scale_decision: _Optional[str] = ..., last_scale_age_s: _Optional[float] = ...) -> None: ...

class ScaleInstancesRequest(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: int
    def __init__(self, instances: _Optional[int] = ...) -> None: ...

class ScaleInstancesResponse(_message.Message):
    __slots__ = ("previous", "instances", "added", "removed", "not_moved", "reason")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    NOT_MOVED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    previous: int
    instances: int
    added: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    not_moved: _containers.RepeatedCompositeFieldContainer[NotMoved]
    reason: str
    def __init__(self, previous: _Optional[int] = ..., instances: _Optional[int] = ..., added: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., not_moved: _Optional[_Iterable[_Union[NotMoved, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class GetInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class GetInstanceResponse(_message.Message):
    __slots__ = ("instance",)
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ...) -> None: ...

class Migration(_message.Message):
    __slots__ = ("migration_id", "request_id", "src", "dst", "state", "stages", "blocks_copied", "downtime_ms", "reason", "started_at", "ended_at")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    src: str
    dst: str
    state: MigrationState
    stages: int
    blocks_copied: int
    downtime_ms: float
    reason: str
    started_at: float
    ended_at: float
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., src: _Optional[str] = ..., dst: _Optional[str] = ..., state: _Optional[_Union[MigrationState, str]] = ..., stages: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., downtime_ms: _Optional[float] = ..., reason: _Optional[str] = ..., started_at: _Optional[float] = ..., ended_at: _Optional[float] = ...) -> None: ...

class NotMoved(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DrainInstanceResponse(_message.Message):
    __slots__ = ("instance_id", "moved", "not_moved", "remaining")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    NOT_MOVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    moved: _containers.RepeatedCompositeFieldContainer[Migration]
    not_moved: _containers.RepeatedCompositeFieldContainer[NotMoved]
    remaining: int
    def __init__(self, instance_id: _Optional[str] = ..., moved: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ..., not_moved: _Optional[_Iterable[_Union[NotMoved, _Mapping]]] = ..., remaining: _Optional[int] = ...) -> None: ...

class UndrainInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class UndrainInstanceResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: InstanceState
    def __init__(self, state: _Optional[_Union[InstanceState, str]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("migrations",)
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[Migration]
    def __init__(self, migrations: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ...) -> None: ...

class MigrateRequestRequest(_message.Message):
    __slots__ = ("request_id", "to_instance_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    to_instance_id: str
    def __init__(self, request_id: _Optional[str] = ..., to_instance_id: _Optional[str] = ...) -> None: ...

class MigrateRequestResponse(_message.Message):
    __slots__ = ("migration",)
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    migration: Migration
    def __init__(self, migration: _Optional[_Union[Migration, _Mapping]] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMigrationsResponse(_message.Message):
    __slots__ = ("in_flight", "recent")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    in_flight: _containers.RepeatedCompositeFieldContainer[Migration]
    recent: _containers.RepeatedCompositeFieldContainer[Migration]
    def __init__(self, in_flight: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ..., recent: _Optional[_Iterable[_Union[Migration, _Mapping]]] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("instance_id", "role")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: InstanceRole
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[InstanceRole, str]] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("previous", "role")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    previous: InstanceRole
    role: InstanceRole
    def __init__(self, previous: _Optional[_Union[InstanceRole, str]] = ..., role: _Optional[_Union[InstanceRole, str]] = ...) -> None: ...
