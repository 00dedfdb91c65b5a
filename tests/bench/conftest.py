import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny pipeline saved as a diffusers folder (what ``--model PATH`` loads)."""
    from tests.bench.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models here gain nothing from intra-op threads, and on a shared machine the threads' waiting costs
    far more than the work: run these tests on one thread, and restore the setting after each."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
