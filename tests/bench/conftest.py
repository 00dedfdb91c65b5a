import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every benchmark test on one intra-op thread (``one_thread`` in tests/conftest.py)."""
