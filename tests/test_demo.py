"""The README's first command: the demo runs end to end on embedded defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_restores_identical_points(tmp_path: Path) -> None:
    result = run_cli("demo", "--dir", str(tmp_path / "demo"), check=True)
    assert result.stdout.count("-> identical") == 3
    assert "restore point unchanged: True" in result.stdout
    assert "is sound" in result.stdout
