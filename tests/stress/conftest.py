"""Fixtures of the stress suite (`make stress`): the real server and the embedded model.

Every module here sets `pytestmark = pytest.mark.stress`, so the default run
(pyproject's addopts: -m 'not stress and not bench') leaves them out and
`pytest -m stress` runs only them. Sizes scale with GREENROOM_STRESS_SCALE
(tests/stress/client.py); each scenario prints one `STRESS <name>: ...` line.
"""

from __future__ import annotations

import pytest

from tests.e2e.models import write_tiny_llama
from tests.e2e.server import ServerProcess


def pytest_collection_modifyitems(config, items):
    # A module here that forgot its pytestmark would run in `make test`: refuse it.
    for item in items:
        if "tests/stress/" in item.nodeid and item.get_closest_marker("stress") is None:
            raise pytest.UsageError(f"{item.nodeid} lacks the stress marker (pytestmark = pytest.mark.stress)")


@pytest.fixture
def start_server(tmp_path):
    """Start a server of the test's own (killed at the end): start_server(*args, cache_dir=, env=)."""
    servers = []

    def start(*extra, cache_dir=None, env=None, timeout=300):
        srv = ServerProcess(cache_dir or tmp_path / "cache", *extra, env=env).start(timeout=timeout)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.kill()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight Llama folder with the embedded tokenizer (a cheap swap target)."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")
