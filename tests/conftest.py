import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Zoo weights trained during tests go to a per-session folder, never the user's cache."""
    old = os.environ.get("TENSORSLIM_CACHE")
    os.environ["TENSORSLIM_CACHE"] = str(tmp_path_factory.mktemp("tensorslim-cache"))
    yield
    if old is None:
        os.environ.pop("TENSORSLIM_CACHE", None)
    else:
        os.environ["TENSORSLIM_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
