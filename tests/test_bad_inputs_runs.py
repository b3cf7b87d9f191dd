"""Bad input to the runner and the trainer never crashes a run, never runs on defaults and never
mixes two runs: `train --set`, notebook parameters (`run -p`, `run -f`), run ids in use, and the
folders a failed start leaves behind. Counted by conftest.py (the ``bad_input`` marker).

No test executes a notebook or trains a model: the checks run before papermill or any loader,
and the runs that get through use a stand-in executor; run folders go to a temporary folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from nb_edit import cli
from nb_edit.core import paths, runs

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    """Run folders under tmp_path; the environment record without importing torch."""
    root = tmp_path / "runs"
    monkeypatch.setattr(paths, "runs_dir", lambda: root)
    monkeypatch.setattr(cli, "environment", lambda: {"python": "test"})
    return root


@pytest.fixture
def no_execution(monkeypatch):
    """Any notebook execution fails the test: the checks must stop the run before it."""
    calls = []

    def refuse(pm, book, out, params, args):
        calls.append(book.name)
        raise AssertionError(f"{book.name} was executed although its input is bad")

    monkeypatch.setattr(cli, "_execute", refuse)
    return calls


@pytest.fixture
def fake_execution(monkeypatch):
    """A stand-in for papermill: writes the output notebook and one metric per notebook."""
    calls = []

    def execute(pm, book, out, params, args):
        calls.append((book.name, dict(params)))
        out.write_text(json.dumps(params))
        runs.record_metrics(runs.open_run(params["run_id"]), {f"test.nb{book.name[:2]}": 1.0})
        return True

    monkeypatch.setattr(cli, "_execute", execute)
    return calls


def _notebook(path, parameters: str):
    cell = nbformat.v4.new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    book = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("print(run_id)")])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, path)


@pytest.fixture
def toy_books(tmp_path, monkeypatch):
    """Two notebooks with one parameter of each type (the shipped ones have no bool)."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    common = 'profile = "tiny"\nseed = 0\nrun_id = ""\n'
    _notebook(folder / "00_alpha.ipynb", common + 'count = 3\nrate = 0.5\nflag = True\nname = "x"\n')
    _notebook(folder / "01_beta.ipynb", common + 'only_beta = "b"\ncount = 3\n')
    monkeypatch.setattr(paths, "notebooks_dir", lambda: folder)
    return folder


def run_cli(capsys, *argv):
    """(exit code, stderr) of ``python -m nb_edit ARGV`` in process."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def refused(capsys, *argv, names, fix):
    """The command ends with exit code 2 and one message naming the input and the fix, no traceback."""
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err and "Fix:" in err, err
    for name in ([names] if isinstance(names, str) else names):
        assert name in err, err
    assert fix.lower() in err.lower(), err
    return err


# --- 1. train --set -------------------------------------------------------------------------


class Loaded(Exception):
    """Raised by the stand-in loaders: reaching one means the overrides were accepted."""


@pytest.fixture
def loaders_refuse(monkeypatch):
    """The data and the trainer raise if reached, so a test sees whether the check came first."""
    from nb_edit.data import world_datasets
    from nb_edit.methods.npedit import train

    def loaded(*args, **kwargs):
        raise Loaded("the data or a model was loaded")

    monkeypatch.setattr(world_datasets, "shapesworld", loaded)
    monkeypatch.setattr(train, "train_npedit", loaded)


@pytest.mark.bad_input
@pytest.mark.parametrize("item, names, fix", [
    ("steps=abc", ["steps", "abc", "int"], "type int"),
    ("steps=2.5", ["steps", "2.5", "int"], "type int"),
    ("steps=-1", ["steps", "-1"], ">= 1"),
    ("steps=0", ["steps", "0"], ">= 1"),
    ("steps=True", ["steps", "True", "int"], "type int"),
    ("steps", ["steps", "NAME=VALUE"], "--set steps=50"),
    ("stepz=5", ["stepz", "did you mean 'steps'"], "use one of"),
    ("=5", ["=5", "name is empty"], "--set steps=50"),
    ("betas=[0.5]", ["betas", "tuple[float, float]"], "[0.0, 0.9]"),
    ("lr=-0.001", ["lr", "-0.001"], "1e-4"),
    ("seed=-3", ["seed", "-3"], ">= 0"),
    ("variant=fulll", ["variant", "fulll"], "change the value"),
    ("profile=full", ["profile"], "--profile"),
])
def test_train_refuses_a_bad_setting_before_anything_loads(capsys, loaders_refuse, item, names, fix):
    refused(capsys, "train", "npedit", "--set", "steps=5", "--set", item, names=names, fix=fix)


def test_train_takes_good_settings_typed_and_then_loads(loaders_refuse):
    with pytest.raises(Loaded):  # the settings passed; the next thing is the data
        cli.main(["train", "npedit", "--set", "steps=5", "--set", "lr=1e-3", "--set", "betas=[0.1, 0.9]",
                  "--set", "copy_warmup_lr=null", "--set", "balance=false"])
    cfg = cli.train_config("npedit", "tiny", ["steps=5", "lr=1e-3", "betas=[0.1, 0.9]", "copy_warmup_lr=null"])
    assert (cfg.steps, cfg.lr, cfg.betas, cfg.copy_warmup_lr) == (5, 1e-3, (0.1, 0.9), None)


@pytest.mark.bad_input
def test_train_from_the_shell_prints_a_message_not_a_traceback(tmp_path):
    env = {**os.environ, "NB_EDIT_THREADS": "1", "NB_EDIT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "nb_edit", "train", "npedit", "--set", "steps"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "NAME=VALUE" in done.stderr and "Fix:" in done.stderr


# --- 2. notebook parameters -----------------------------------------------------------------


@pytest.mark.bad_input
@pytest.mark.parametrize("name, value, names, fix", [
    ("count", "abc", ["count", "00_alpha.ipynb", "int", "'abc'"], "pass an int"),
    ("count", "2.5", ["count", "int", "2.5"], "pass an int"),
    ("count", "true", ["count", "int", "True"], "pass an int"),
    ("rate", "fast", ["rate", "float", "'fast'"], "pass a float"),
    ("flag", "maybe", ["flag", "bool", "'maybe'"], "pass a bool"),
    ("flag", "1", ["flag", "bool"], "pass a bool"),
    ("name", "5", ["name", "str"], "quote text"),
    ("count", "[1,", ["count", "not valid YAML"], "quote it"),
])
def test_run_refuses_a_parameter_of_the_wrong_type(capsys, runs_root, toy_books, no_execution, name, value, names,
                                                   fix):
    refused(capsys, "run", "--run-id", "typed", "-p", name, value, names=names, fix=fix)
    assert not no_execution and not (runs_root / "typed").exists()


@pytest.mark.bad_input
def test_run_refuses_an_unknown_parameter_naming_the_closest_and_its_notebooks(capsys, runs_root, no_execution):
    err = refused(capsys, "run", "--run-id", "typo", "-p", "stepz", "5",
                  names=["stepz", "did you mean 'steps'", "05_npedit.ipynb", "08_evaluation.ipynb"],
                  fix="parameters cells")
    assert not no_execution and not (runs_root / "typo").exists(), err


@pytest.mark.bad_input
def test_run_refuses_an_unknown_key_of_a_parameter_file(capsys, tmp_path, runs_root, no_execution):
    file = tmp_path / "params.yaml"
    file.write_text("profile: tiny\nseed: 0\nsteps: 5\nteacher_guidence: 3.0\n")
    refused(capsys, "run", "--run-id", "filetypo", "-f", str(file), "--only", "03,05",
            names=["teacher_guidence", str(file), "did you mean 'teacher_guidance'"], fix="parameters cells")
    assert not no_execution and not (runs_root / "filetypo").exists()


@pytest.mark.bad_input
def test_run_refuses_a_parameter_no_selected_notebook_takes(capsys, runs_root, toy_books, no_execution):
    refused(capsys, "run", "--run-id", "narrow", "--only", "00", "-p", "only_beta", "z",
            names=["only_beta", "01_beta.ipynb", "00_alpha.ipynb"], fix="--only")
    assert not (runs_root / "narrow").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, names, fix", [
    (["-p", "profile", "huge"], ["profile", "huge"], "tiny, full, smoke"),
    (["-p", "run_id", "other"], ["run_id"], "--run-id"),
    (["--only", "42"], ["--only", "42"], "notebook numbers"),
    (["-f", "no/such/params.yaml"], ["no/such/params.yaml", "not found"], "check the path"),
])
def test_run_refuses_other_bad_arguments_before_making_a_folder(capsys, runs_root, toy_books, no_execution, argv,
                                                               names, fix):
    refused(capsys, "run", "--run-id", "other", *argv, names=names, fix=fix)
    assert not no_execution and not (runs_root / "other").exists()


def test_a_parameter_some_selected_notebooks_take_is_passed_converted(runs_root, toy_books, fake_execution):
    assert cli.main(["run", "--run-id", "good", "-p", "only_beta", "z", "-p", "rate", "2", "-p", "count", "4"]) == 0
    assert [name for name, _ in fake_execution] == ["00_alpha.ipynb", "01_beta.ipynb"]
    params = fake_execution[0][1]
    assert params["rate"] == 2.0 and isinstance(params["rate"], float) and params["count"] == 4
    assert params["only_beta"] == "z" and params["run_id"] == "good"  # papermill passes it on harmlessly
    assert runs.read_metrics(runs.open_run("good")) == {"test.nb00": 1.0, "test.nb01": 1.0}


def test_a_file_key_for_notebooks_left_out_by_only_is_a_note(capsys, tmp_path, runs_root, toy_books,
                                                             fake_execution):
    """The shipped files serve the whole pipeline (seeds.yaml with --only 05 sets `overrides` for 06)."""
    file = tmp_path / "params.yaml"
    file.write_text("count: 2\nonly_beta: z\n")
    assert cli.main(["run", "--run-id", "part", "-f", str(file), "--only", "00"]) == 0
    assert "only_beta" in capsys.readouterr().err and [n for n, _ in fake_execution] == ["00_alpha.ipynb"]


def test_the_shipped_parameter_files_pass(runs_root):
    for name in ("tiny", "full", "seeds", "multireward_full"):
        params = cli.load_parameters([f"papermill_runs/{name}.yaml"], [])
        params = {k: v for k, v in params.items() if k not in cli.SEED_STUDY_KEYS}
        cli.check_notebook_parameters(params, cli.notebook_list())


# --- 3. run ids in use ----------------------------------------------------------------------


@pytest.mark.bad_input
def test_reusing_a_run_id_without_a_flag_is_refused_and_keeps_the_run(capsys, runs_root, toy_books,
                                                                     fake_execution):
    assert cli.main(["run", "--run-id", "taken", "-p", "count", "1"]) == 0
    before = {p.name: p.read_bytes() for p in (runs_root / "taken").iterdir() if p.is_file()}
    refused(capsys, "run", "--run-id", "taken", "-p", "count", "2", names=["taken", "already holds a run"],
            fix="choose a new --run-id")
    after = {p.name: p.read_bytes() for p in (runs_root / "taken").iterdir() if p.is_file()}
    assert after == before and len(fake_execution) == 2


@pytest.mark.bad_input
def test_the_refusal_names_every_fix(capsys, runs_root, toy_books, fake_execution):
    assert cli.main(["run", "--run-id", "taken"]) == 0
    refused(capsys, "run", "--run-id", "taken", names=["--resume", "--overwrite", "--run-id"], fix="new --run-id")


@pytest.mark.bad_input
def test_resume_with_other_parameters_is_refused_naming_them(capsys, runs_root, toy_books, fake_execution):
    assert cli.main(["run", "--run-id", "study", "--only", "00", "-p", "count", "1", "-p", "rate", "0.5"]) == 0
    refused(capsys, "run", "--run-id", "study", "--resume", "--only", "01", "-p", "count", "2", "-p", "rate", "0.5",
            names=["study", "count: 1 -> 2"], fix="same -f/-p parameters")
    assert len(fake_execution) == 1 and not (runs_root / "study" / "01_beta.ipynb").exists()


@pytest.mark.bad_input
def test_a_stale_seed_run_of_the_same_id_is_refused(capsys, tmp_path, runs_root, toy_books, no_execution):
    runs.record_metrics(runs.open_run("seeded.seed1"), {"test.stale": 9.0})  # left by an earlier study
    file = tmp_path / "seeds.yaml"
    file.write_text("seeds: [0, 1]\nseed_notebooks: '00'\n")
    refused(capsys, "run", "--run-id", "seeded", "-f", str(file), names=["seeded.seed1"], fix="--overwrite")
    assert not no_execution and not (runs_root / "seeded").exists()


def test_resume_with_the_same_parameters_adds_notebooks(runs_root, toy_books, fake_execution):
    assert cli.main(["run", "--run-id", "parts", "--only", "00", "-p", "count", "1"]) == 0
    assert cli.main(["run", "--run-id", "parts", "--resume", "--only", "01", "-p", "count", "1"]) == 0
    config = runs.read_config(runs_root / "parts")
    assert config["notebooks"] == ["00_alpha.ipynb", "01_beta.ipynb"]
    assert set(config["timings_s"]) == {"00_alpha.ipynb", "01_beta.ipynb"}
    assert runs.read_metrics(runs.open_run("parts")) == {"test.nb00": 1.0, "test.nb01": 1.0}


def test_overwrite_replaces_the_run_and_its_stale_metrics(runs_root, toy_books, fake_execution):
    assert cli.main(["run", "--run-id", "again", "--only", "00"]) == 0
    runs.record_metrics(runs.open_run("again"), {"test.stale": 1.0})
    assert cli.main(["run", "--run-id", "again", "--overwrite", "--only", "01", "-p", "count", "7"]) == 0
    assert runs.read_metrics(runs.open_run("again")) == {"test.nb01": 1.0}
    assert runs.read_config(runs_root / "again")["parameters"]["count"] == 7
    assert not (runs_root / "again" / "00_alpha.ipynb").exists()


def test_make_run_gets_a_fresh_id_each_time(runs_root, toy_books, fake_execution):
    """`make run` without RUN_ID passes a date-time id, which is never in use."""
    assert cli.main(["run", "--run-id", runs.new_run_id() + "-a"]) == 0
    assert cli.main(["run", "--run-id", runs.new_run_id() + "-b"]) == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("command", ["report", "publish"])
def test_report_and_publish_of_a_missing_run_make_no_folder(capsys, runs_root, command):
    runs.open_run("present")
    refused(capsys, command, "--run-id", "absent", names=["absent", "no run folder"], fix="present")
    assert not (runs_root / "absent").exists()


def test_report_and_publish_still_open_an_existing_run(capsys, runs_root, toy_books, fake_execution, monkeypatch):
    from nb_edit.notebook import outputs

    assert cli.main(["run", "--run-id", "done"]) == 0
    assert cli.main(["report", "--run-id", "done"]) == 0
    published = []
    monkeypatch.setattr(outputs, "publish", lambda src, dst: published.append((src.name, dst.name)))
    assert cli.main(["publish", "--run-id", "done"]) == 0
    assert published == [("00_alpha.ipynb", "00_alpha.ipynb"), ("01_beta.ipynb", "01_beta.ipynb")]


# --- 4. folders of failed runs --------------------------------------------------------------


@pytest.mark.bad_input
def test_a_run_failing_before_any_output_removes_the_folder_it_made(capsys, runs_root, toy_books, monkeypatch):
    def no_kernel(pm, book, out, params, args):
        raise RuntimeError("No such kernel named python3")

    monkeypatch.setattr(cli, "_execute", no_kernel)
    with pytest.raises(RuntimeError, match="kernel"):
        cli.main(["run", "--run-id", "nokernel"])
    assert not (runs_root / "nokernel").exists()
    assert "removed" in capsys.readouterr().err


def test_a_failed_notebook_keeps_its_run_folder(runs_root, toy_books, monkeypatch):
    def fails(pm, book, out, params, args):
        out.write_text("{}")  # papermill writes the output notebook as it goes
        return False

    monkeypatch.setattr(cli, "_execute", fails)
    assert cli.main(["run", "--run-id", "failed"]) == 1
    assert (runs_root / "failed" / "00_alpha.ipynb").exists() and (runs_root / "failed" / "report.md").exists()


def test_a_folder_that_existed_before_is_never_removed(runs_root, toy_books, monkeypatch):
    (runs_root / "mine").mkdir(parents=True)  # made by hand, empty: not in use, not ours to delete

    def no_kernel(pm, book, out, params, args):
        raise RuntimeError("No such kernel named python3")

    monkeypatch.setattr(cli, "_execute", no_kernel)
    with pytest.raises(RuntimeError):
        cli.main(["run", "--run-id", "mine"])
    assert (runs_root / "mine").is_dir()


@pytest.mark.parametrize("flags, expected", [([], None), (["--cell-timeout", "600"], 600)])
def test_a_cell_runs_without_a_time_limit_unless_one_is_given(monkeypatch, runs_root, toy_books, flags, expected):
    """A seed study's training cell runs for hours on two cores: by default the runner gives papermill no
    cell limit (it used to stop such a cell after an hour)."""
    seen = []

    class FakePapermill:
        PapermillExecutionError = RuntimeError

        @staticmethod
        def execute_notebook(book, out, **kwargs):
            seen.append(kwargs["execution_timeout"])
            Path(out).write_text(Path(book).read_text())

    real = cli._execute
    monkeypatch.setattr(cli, "_execute", lambda pm, book, out, params, args: real(FakePapermill, book, out, params, args))
    assert cli.main(["run", "--run-id", "limits", "--only", "00", *flags]) == 0
    assert seen == [expected]
