import pytest
import torch

from instance.kv_cache import BlockPool, KVCacheTensors, OutOfBlocksError


def test_two_phase_allocation_never_leaves_half_done_state():
    pool = BlockPool(8)
    assert pool.can_allocate(8) and not pool.can_allocate(9)
    a = pool.allocate(5)
    assert not pool.can_allocate(4)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(4)
    assert pool.num_free == 3 and pool.num_used == 5   # the failed call took nothing
    pool.free(a)
    assert pool.num_free == 8
    pool.check_integrity()


def test_reserved_blocks_are_apart_from_used_and_free():
    pool = BlockPool(10)
    used = pool.allocate(3)
    res = pool.reserve(4)
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (3, 3, 4)
    pool.check_integrity()
    pool.commit_reserved(res[:2])
    pool.release_reserved(res[2:])
    assert (pool.num_free, pool.num_used, pool.num_reserved) == (5, 5, 0)
    with pytest.raises(ValueError):
        pool.release_reserved(res[:1])      # no longer reserved
    pool.free(used + res[:2])
    assert pool.num_free == 10
    pool.check_integrity()


def test_double_free_is_refused_and_integrity_detects_corruption():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError):
        pool.free(ids)
    pool._free.append(pool._free[0])         # simulate a bug: a block listed free twice
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_export_import_round_trip_is_exact():
    src = KVCacheTensors(3, 10, 4, 2, 8, torch.float32, "cpu")
    dst = KVCacheTensors(3, 12, 4, 2, 8, torch.float32, "cpu")
    src.data.normal_()
    blob = src.export_blocks([7, 2, 5])
    assert blob.is_contiguous() and blob.shape == (3, 2, 3, 4, 2, 8)
    dst.import_blocks([0, 11, 4], blob)
    assert torch.equal(dst.data[:, :, 0], src.data[:, :, 7])
    assert torch.equal(dst.data[:, :, 11], src.data[:, :, 2])
    assert torch.equal(dst.data[:, :, 4], src.data[:, :, 5])
    with pytest.raises(ValueError, match="shape"):
        dst.import_blocks([1, 2], blob)
