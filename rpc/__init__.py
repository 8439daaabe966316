"""The process boundary: typed clients for the three kinds of actor (instances, frontends, the scheduler).

Every call from one Tidal process to another goes through a client here: it owns creating, finding and killing
its actor, and every `.remote()` on it, with one deadline policy (`Deadlines`) and one error mapping
(`ActorDead`, `ActorTimeout`, `Rejected`). A call returns a `Call`: await it in async code, or `.result()` it
in sync code (tests, benchmarks, `tidal serve`). Nothing outside this package calls `.remote()` on those
actors (tests/unit/test_boundaries.py checks), so a test can swap a whole client for a fake.
"""

from rpc.call import ActorDead, ActorTimeout, Call, Deadlines, Rejected, RemoteError
from rpc.tasks import BackgroundTasks

__all__ = ["ActorDead", "ActorTimeout", "BackgroundTasks", "Call", "Deadlines", "Rejected", "RemoteError"]
