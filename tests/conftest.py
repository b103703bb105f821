"""Test configuration: property tests are derandomised so every run checks the same cases."""
from hypothesis import settings

settings.register_profile("haprune", derandomize=True, database=None, print_blob=True)
settings.load_profile("haprune")

import pytest


@pytest.fixture(autouse=True)
def _private_sensitivity_cache(tmp_path_factory, monkeypatch):
    """CLI runs cache sensitivity passes under $HAPRUNE_CACHE_DIR: never the user's ~/.cache in tests."""
    monkeypatch.setenv("HAPRUNE_CACHE_DIR", str(tmp_path_factory.mktemp("haprune-cache")))
