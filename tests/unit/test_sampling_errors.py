"""Errors that cross process boundaries (inside Ray task errors) must survive pickling intact."""

import pickle

from instance.sampling import InvalidRequestError
from migration.protocol import MigrationAborted, MigrationState
from orchestrator.errors import AdminError


def test_errors_round_trip_through_pickle():
    e = pickle.loads(pickle.dumps(InvalidRequestError("top_p", "must be in (0, 1], got 1.5")))
    assert e.field == "top_p" and str(e) == "top_p: must be in (0, 1], got 1.5"
    m = pickle.loads(pickle.dumps(MigrationAborted(MigrationState.ABORTED_DST, "out of blocks")))
    assert m.state is MigrationState.ABORTED_DST and m.reason == "out of blocks"
    a = pickle.loads(pickle.dumps(AdminError("NOT_FOUND", "no instance 'x'")))
    assert a.code == "NOT_FOUND" and a.message == "no instance 'x'"
