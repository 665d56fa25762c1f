"""wrpo_nemo.cli: a user's error ends with one line on stderr and exit code 2; --debug and other errors raise."""

import os

import pytest

from wrpo_nemo.cli import SHOW_LIBRARY_WARNINGS, user_errors
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


# megatron-core's own warnings, raised as it is imported on a machine without TransformerEngine/Apex: recorded
# in a fresh interpreter (this one may have imported megatron already).
_RECORD_IMPORT_WARNINGS = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs
print(json.dumps([[w.category.__name__, str(w.message)] for w in caught]))
"""


def test_the_filter_drops_the_pinned_megatrons_real_fallback_warnings_on_a_cpu_machine():
    import json
    import subprocess
    import sys
    import warnings

    from wrpo_nemo.cli import quiet_library_warnings

    out = subprocess.run(
        [sys.executable, "-c", _RECORD_IMPORT_WARNINGS],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    fallback = [
        m for c, m in json.loads(out.stdout.splitlines()[-1]) if c == "UserWarning" and "installed" in m
    ]
    assert fallback, "megatron-core no longer warns about its TE/Apex fallback: revisit cli.CPU_CHATTER"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings(gpu=False)
        for message in fallback:
            warnings.warn(message, UserWarning, stacklevel=1)
    assert caught == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.environ[SHOW_LIBRARY_WARNINGS] = "1"
        try:
            quiet_library_warnings(gpu=False)
        finally:
            del os.environ[SHOW_LIBRARY_WARNINGS]
        warnings.warn(fallback[0], UserWarning, stacklevel=1)
    assert len(caught) == 1  # asked for: shown


def test_the_filter_keeps_other_warnings_and_the_gpu_fallback_warning_on_a_gpu():
    import warnings

    from wrpo_nemo.cli import quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings(gpu=True)
        warnings.warn(
            "Transformer Engine and Apex are not installed. Falling back", UserWarning, stacklevel=1
        )
        warnings.warn("full scope is deprecated. Use empty cuda_graph_scope", UserWarning, stacklevel=1)
        warnings.warn("the learning rate is zero", UserWarning, stacklevel=1)
    assert [str(w.message)[:20] for w in caught] == ["Transformer Engine a", "the learning rate is"]
