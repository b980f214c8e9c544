"""full_sync on several ranks equals the single-process model, for diffusers and hand-written UNets."""

import pytest
import torch
from dist import run_ranks
from models import FACTORIES, as_tensor

from districompile.metrics import relative_error

TOLERANCE = 1e-4  # fp32 relative error: max |distri - eager| / max |eager|


def compare_models(rank, world, height, batch, lowering, factories):
    errors = {}
    for factory in factories:
        torch._dynamo.reset()
        model, args, kwargs = factory(height=height, batch=batch)
        with torch.no_grad():
            ref = as_tensor(model(*args, **kwargs))
            # Unsplit: every rank shares the image (tests/test_batch_split.py covers split_batch).
            options = {"sync_mode": "full_sync", "lowering": lowering, "split_batch": False}
            compiled = torch.compile(model, backend="distri", options=options)
            errors[factory.__name__] = relative_error(as_tensor(compiled(*args, **kwargs)), ref)
    return errors


# world -> (latent height, batch): 3 ranks get uneven row blocks, and the middle one halos from both
# sides. A world of 4 adds no other case (tests/test_batch_split.py runs one: two halves of 2 ranks).
CASES = {
    2: (32, 1),
    3: (40, 2),
}


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda w: f"world{w}")
def eager_errors(request):
    world = request.param
    height, batch = CASES[world]
    return run_ranks(compare_models, world, height, batch, "eager", FACTORIES, timeout=600)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_full_sync_matches_single_device(eager_errors, factory):
    for rank, errors in enumerate(eager_errors):
        assert errors[factory.__name__] < TOLERANCE, f"rank {rank}: {errors}"


