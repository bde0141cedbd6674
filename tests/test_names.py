"""The name rules: what each kind of name may be, the same for the CLI, the API and the store."""

from __future__ import annotations

import re

import pytest

from appliance.errors import InvalidName, NameTooLong
from appliance.names import JOB_ID, POINT_REF, SESSION_NAME, VM_NAME, NameRule


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "is empty"),
        (".", "may not start with '.'"),
        ("..", "may not start with '.'"),
        (".hidden", "may not start with '.'"),
        ("a/b", "may not contain '/'"),
        ("../etc", "may not start with '.'"),
        ("a\\b", "may not contain '\\\\\\\\'"),
        ("nul\x00byte", "may not contain '\\\\x00' \\(character 4\\)"),
        ("tab\there", "may not contain '\\\\t'"),
        ("c1\x85control", "may not contain '\\\\x85'"),
        ("bad\udcffutf8", "may not contain '\\\\udcff'"),
        ("astral \U0001f600", "may not contain"),
        ("x" * 81, "longer than 80 characters"),
    ],
)
def test_unsafe_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(InvalidName, match=problem):
        VM_NAME.check(name)


def test_an_overlong_name_is_name_too_long() -> None:
    with pytest.raises(NameTooLong):
        SESSION_NAME.check("s" * 81)


@pytest.mark.parametrize("name", ["web01", "SQL Server 2019", "vm-1.example.com", "x" * 80, "é" * 80, "日本語のVM"])
def test_ordinary_names_pass(name: str) -> None:
    assert VM_NAME.check(name) == name
    assert len(name.encode()) <= 255  # every name the rule allows fits a file system's component


@pytest.mark.parametrize("ref", ["latest", "20261122T032050Z-3fa1", "20261122"])
def test_point_refs(ref: str) -> None:
    assert POINT_REF.check(ref) == ref


@pytest.mark.parametrize("ref", ["", "../x", "a b", "x" * 65, "latest\n"])
def test_bad_point_refs_and_job_ids(ref: str) -> None:
    with pytest.raises(InvalidName):
        POINT_REF.check(ref)
    with pytest.raises(InvalidName):
        JOB_ID.check(ref)


@pytest.mark.parametrize("rule", [VM_NAME, SESSION_NAME, POINT_REF, JOB_ID])
def test_the_published_schema_is_the_rule(rule: NameRule) -> None:
    """What the OpenAPI document states (pattern, lengths) decides exactly as `check` does."""
    schema = rule.json_schema()
    samples = ["", "a", ".a", "a.", "a/b", "-", "latest", "x" * rule.max_length, "x" * (rule.max_length + 1),
               "é", "\x7f", "a\u00a0b", "\ufffe", "\U0001f600", "\udc80"]
    for sample in samples:
        by_schema = (schema["minLength"] <= len(sample) <= schema["maxLength"]
                     and re.search(schema["pattern"], sample) is not None)
        try:
            rule.check(sample)
            by_check = True
        except InvalidName:
            by_check = False
        assert by_schema == by_check, sample
