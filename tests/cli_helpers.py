"""What every command-line test checks of bad input: exit status 2, one line on stderr, no traceback."""

import pytest

from fastcache_rt.cli import main


def expect_usage_error(argv, capsys, *fragments) -> str:
    """Run ``fastcache-rt argv``; it must end with exit status 2 and one ``fastcache-rt: error: ...`` line on stderr
    containing every fragment. Returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastcache-rt: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
