import pytest

from tests.e2e.server import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One shared server with the embedded model for tests that do not restart it."""
    srv = ServerProcess(tmp_path_factory.mktemp("greenroom-shared")).start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of the test's own, for tests that stop, restart or kill it."""
    servers = []

    def start(*extra, cache_dir=None, port=None, env=None):
        srv = ServerProcess(cache_dir or tmp_path / "cache", *extra, port=port, env=env).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.kill()
