"""wrpo_nemo.cli: a user's error ends with one line on stderr and exit code 2; --debug and other errors raise."""

import pytest

from wrpo_nemo.cli import user_errors
from wrpo_nemo.data.records import DataError
from wrpo_nemo.errors import InputError
from wrpo_nemo.training.config import ConfigError


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (InputError("/m/config.json", "not valid JSON"), "input error: /m/config.json: not valid JSON"),
        (DataError("d.jsonl: line 3", "rejected", "missing", "missing_field"), "data error: d.jsonl: line 3: "
         "field 'rejected': missing"),
        (ConfigError("sft.lr must be a number"), "config error: sft.lr must be a number"),
        (FileExistsError("output o already exists;\npass --overwrite"), "error: output o already exists; pass "
         "--overwrite"),
    ],
)  # fmt: skip
def test_a_user_error_prints_one_line_and_exits_2(error, line, capsys):
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise error
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_debug_and_other_errors_propagate(capsys):
    with pytest.raises(InputError), user_errors(debug=True):
        raise InputError("x.nemo", "not a .nemo archive")
    with pytest.raises(KeyError), user_errors():
        raise KeyError("a bug, not an input")
    assert capsys.readouterr().err == ""
