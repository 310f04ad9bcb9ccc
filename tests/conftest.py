"""Shared pytest set-up: the repo root is importable (`import collect_datasets`), and `minari_store` points Minari at
an empty temporary store so no test touches ~/.minari."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    """An empty MINARI_DATASETS_PATH for this test; returns its path."""
    store = tmp_path / "minari_store"
    store.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    return store
