import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compile every test from scratch: Dynamo's caches and recompile counters outlive a test."""
    yield
    torch._dynamo.reset()
