from tests.server.conftest import pipeline  # noqa: F401  (the tiny real pipeline fixture)
