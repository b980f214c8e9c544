"""The test models run eagerly, and the multi-rank harness works."""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from models import FACTORIES, as_tensor


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_factory_runs_eagerly(factory):
    model, args, kwargs = factory()
    with torch.no_grad():
        out = as_tensor(model(*args, **kwargs))
    assert out.shape == args[0].shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_factory_is_deterministic(factory):
    # Every rank builds its own copy, so the copies must agree bit for bit.
    (model1, args1, kwargs1), (model2, args2, kwargs2) = factory(), factory()
    with torch.no_grad():
        torch.testing.assert_close(
            as_tensor(model1(*args1, **kwargs1)), as_tensor(model2(*args2, **kwargs2)), rtol=0, atol=0
        )


def _all_reduce_rank_ids(rank, world_size):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return value, rank


def test_run_ranks_all_reduce():
    results = run_ranks(_all_reduce_rank_ids, 2)
    assert [rank for _, rank in results] == [0, 1]
    for value, _ in results:
        assert value.item() == 3.0


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait here forever: run_ranks must kill it


def test_run_ranks_reraises_rank_error():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed.*ValueError: boom on rank one"):
        run_ranks(_fail_on_rank_one, 2)
