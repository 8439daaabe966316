"""`tidal scale` takes either --instances N or INSTANCE --ep N [--dry-run], and says so when given neither or
both (before any server is contacted)."""

import pytest

from orchestrator import cli


@pytest.mark.parametrize("argv", [["scale"], ["scale", "i0"], ["scale", "--ep", "2"],
                                  ["scale", "i0", "--instances", "2"], ["scale", "i0", "--ep", "2", "--instances", "2"]])
def test_scale_needs_exactly_one_form(argv, capsys):
    assert cli.main(argv + ["--addr", "127.0.0.1:1"]) == cli.EXIT_FAILED
    assert "give either --instances N, or INSTANCE --ep N" in capsys.readouterr().err


@pytest.mark.parametrize("argv,what", [(["scale", "--instances", "2"], "scale"),
                                       (["scale", "i0", "--ep", "2", "--dry-run"], "scale")])
def test_both_forms_parse_and_reach_for_the_server(argv, what, capsys):
    assert cli.main(argv + ["--addr", "127.0.0.1:1", "--timeout", "2"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith(f"tidal {what}:") and "give either" not in err
