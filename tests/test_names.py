"""Names users give become path components: anything unsafe is refused."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidName
from appliance.names import check_name


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "empty"),
        (".", "start with '.'"),
        ("..", "start with '.'"),
        (".hidden", "start with '.'"),
        ("a/b", "'/'"),
        ("../etc", "start with '.'"),
        ("a\\b", "'/'"),
        ("nul\x00byte", "NUL"),
        ("tab\there", "control"),
        ("x" * 256, "longer than 255"),
        ("é" * 128, "longer than 255"),
    ],
)
def test_unsafe_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(InvalidName, match=problem):
        check_name("VM", name)


@pytest.mark.parametrize("name", ["web01", "SQL Server 2019", "vm-1.example.com", "x" * 255, "é" * 127])
def test_ordinary_names_pass(name: str) -> None:
    assert check_name("VM", name) == name
