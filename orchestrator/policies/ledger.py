"""The ledger of rebalancing moves: when each instance and each request last took part in one, which is what
the migration policy's cooldowns read.

The live scheduler and the simulator keep one each and plan through it, so both prune and record the same way.
Pure: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.policies.migration import (InstanceState, MigrationPolicyConfig, PlannedMove, plan_migrations,
                                             recent_moves)


@dataclass
class MoveLedger:
    policy: MigrationPolicyConfig
    last_move_at: dict[str, float] = field(default_factory=dict)        # instance id -> its last move
    request_moved_at: dict[str, float] = field(default_factory=dict)    # request id -> when it last moved

    def plan(self, instances: list[InstanceState], now: float) -> list[PlannedMove]:
        """`plan_migrations` with this ledger's cooldowns; forgets requests whose cooldown is over."""
        self.request_moved_at = recent_moves(self.request_moved_at, now, self.policy)
        return plan_migrations(instances, self.policy, now, self.last_move_at, self.request_moved_at)

    def record(self, move: PlannedMove, now: float) -> None:
        """A rebalancing move was started: both instances and the request cool down from `now`."""
        self.last_move_at[move.src] = self.last_move_at[move.dst] = now
        self.request_moved_at[move.request_id] = now
