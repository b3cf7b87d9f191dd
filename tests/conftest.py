"""Shared pytest set-up.

The ``bad_input`` marker tags tests that feed the code a broken input (corrupt image, empty
instruction, wrong notebook parameter...). At the end of a session that ran any of them, the
number tried and handled (passed) is printed and merged into ``papermill_runs/tests/metrics.json``
as ``reliability.bad_inputs_tried`` and ``reliability.bad_inputs_handled``.
"""

from __future__ import annotations

_bad_inputs = {"tried": 0, "handled": 0}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bad_input: feeds a broken input; counted in reliability.bad_inputs_* metrics")


def pytest_runtest_logreport(report):
    if "bad_input" not in report.keywords:
        return
    # a test counts once: at its call phase, or at setup if it failed (or was skipped) there
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            return
        _bad_inputs["tried"] += 1
        _bad_inputs["handled"] += int(report.passed)


def pytest_terminal_summary(terminalreporter):
    if not _bad_inputs["tried"]:
        return
    from nb_edit.core.runs import open_run, record_metrics

    metrics = {"reliability.bad_inputs_tried": _bad_inputs["tried"],
               "reliability.bad_inputs_handled": _bad_inputs["handled"]}
    record_metrics(open_run("tests"), metrics)
    terminalreporter.write_line(" ".join(f"{key}={value}" for key, value in metrics.items()))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_standins(tmp_path_factory):
    """Every stand-in of ``make pretrain`` at smoke sizes (random-ish, seconds), made once per
    test session into a temporary folder, with its checkpoints in a private cache."""
    from nb_edit.standins import pretrain

    root = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NB_EDIT_CACHE", str(tmp_path_factory.mktemp("pretrain_cache")))
        pretrain.run(profile="smoke", root=root, num_threads=1)
    return root


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The ShapesWorld datasets at smoke sizes, built once per test session in a private cache."""
    from nb_edit.core.config import RunSettings
    from nb_edit.data.world_datasets import shapesworld

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NB_EDIT_CACHE", str(tmp_path_factory.mktemp("data_cache")))
        return shapesworld(RunSettings.for_profile("smoke"))
