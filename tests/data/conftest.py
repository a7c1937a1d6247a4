"""Dataset tests see no system copy of Fashion-MNIST unless a test points at one."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(tmp_path_factory, monkeypatch):
    """Point the Debian fallback folder at an empty one, so results do not depend on the host."""
    monkeypatch.setenv("FLATCLI_FASHION_MNIST_DIR", str(tmp_path_factory.mktemp("no-system-copy")))
