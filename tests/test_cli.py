"""The command line: ``clipray check`` on every shipped file, one-line errors with exit code 2 and
nothing written, and ``clipray train`` (files, progress, recall, no overwrite, exact resume)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import clipray.cli.train
from clipray.cli.main import build_parser, main
from clipray.config.loading import load_experiment
from clipray.config.space import load_space
from clipray.core.checkpoint import load_checkpoint
from clipray.core.model import build_model
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))
SHIPPED = SWEEPS + SPACES
DEFAULT_SWEEP = REPO / "sweeps" / "default.yaml"

RUN = [  # on top of the shipped default sweep: 8 steps, a checkpoint every 2, PGD on
    *TINY,
    "train.epochs=2",
    "train.checkpoint_every_steps=2",
    "perturb.epsilon=0.2",
    "perturb.steps=1",
    "perturb.layer=1",
]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


# --------------------------------------------------------------------------- check: shipped files
def _sections(stdout: str) -> list[tuple[str, object]]:
    """Split ``check`` output into (header line, parsed YAML body) per file."""
    parts = re.split(r"^(# .*)$", stdout, flags=re.M)[1:]
    return [(parts[i], yaml.safe_load(parts[i + 1])) for i in range(0, len(parts), 2)]


def test_files_are_shipped():
    assert SWEEPS and SPACES


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_check_accepts_every_shipped_file_and_prints_the_resolved_config(
    path, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    ((header, body),) = _sections(out)
    if path in SWEEPS:
        assert header == f"# {path}: experiment OK"
        exp = load_experiment(path)
        assert body == exp.to_dict()
        if exp.sweep.space is not None:  # resolved next to the file and valid for it
            assert Path(body["sweep"]["space"]).is_absolute()
            load_space(exp.sweep.space, exp)
    else:
        space = load_space(path)
        assert header == f"# {path}: search space OK ({len(space.params)} parameters)"
        assert body == {k: v.model_dump(mode="json") for k, v in space.params.items()}
        written = yaml.safe_load(path.read_text())
        assert list(body) == list(written)  # every parameter, in the file's order
        for name, spec in written.items():  # as written, plus the defaults filled in
            assert {k: body[name][k] for k in spec} == spec
    assert _files(tmp_path) == set()


def test_check_takes_several_files_and_applies_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["check", *map(str, SHIPPED), "--set", "perturb.epsilon=0.25"]
    assert main(args) == 0
    sections = _sections(capsys.readouterr().out)
    assert len(sections) == len(SHIPPED)
    experiments = [body for header, body in sections if header.endswith("experiment OK")]
    assert experiments and all(b["perturb"]["epsilon"] == 0.25 for b in experiments)


def _leading_comment(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path} must start with a comment"
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line)
    return block


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_file_starts_with_the_command_that_runs_it(path):
    block = _leading_comment(path)
    assert re.search(r"\bclipray [a-z]+", block[0]), "the first line gives the command"
    commands = re.findall(r"\bclipray [a-z]+(?: [^\s#]+)*", "\n".join(block))
    named = {Path(tok) for cmd in commands for tok in cmd.split() if tok.endswith(".yaml")}
    for rel in named:
        assert (REPO / rel).is_file(), f"{path.name} names {rel}, which does not exist"
    if path in SWEEPS:
        assert path.relative_to(REPO) in named, f"no command in the header runs {path.name}"
    else:  # a space names a sweep that uses it
        users = [rel for rel in named if load_experiment(REPO / rel).sweep.space == path]
        assert users, f"the header of {path.name} names no sweep that uses it"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_commands_in_headers_are_real_commands_that_parse(path):
    """Every ``clipray ...`` in the header is a registered subcommand with valid arguments
    (parsed only, not run) and its ``--set`` values load."""
    parser = build_parser()
    commands = re.findall(r"\bclipray ([a-z]+(?: [^\s#]+)*)", "\n".join(_leading_comment(path)))
    assert commands
    for cmd in commands:
        try:  # argparse exits 2 on a word that is not one of its subcommands ("invalid choice")
            args = parser.parse_args(cmd.split())
        except SystemExit:
            pytest.fail(f"{path.name}: 'clipray {cmd}' is not a command that parses")
        assert args.command == cmd.split()[0]
        if getattr(args, "set", None):
            file = getattr(args, "file", None) or str(REPO / "sweeps" / "default.yaml")
            load_experiment(REPO / file, args.set)


# -------------------------------------------------------------------------------- bad input
EXP = "seed: 0\n"
BAD = [  # id, files to write, argv (after the subcommand), words the message must contain
    ("unknown-key", {"e.yaml": "train: {epoch: 3}\n"}, ["e.yaml"], ["train.epoch", "unknown key"]),
    (
        "wrong-type",
        {"e.yaml": EXP},
        ["e.yaml", "--set", "train.epochs=many"],
        ["train.epochs", "integer"],
    ),
    (
        "negative-epsilon",
        {"e.yaml": EXP},
        ["e.yaml", "--set", "perturb.epsilon=-0.1"],
        ["perturb.epsilon", "greater than or equal to 0"],
    ),
    (
        "negative-steps",
        {"e.yaml": "perturb: {steps: -2}\n"},
        ["e.yaml"],
        ["perturb.steps", "greater than or equal to 0"],
    ),
    (
        "layer-too-deep",
        {"e.yaml": EXP},
        ["e.yaml", "--set", "perturb.layer=4"],
        ["perturb.layer", "depth", "-4..3"],
    ),
    (
        "unknown-model",
        {"e.yaml": "model: {name: ViT-Nope}\n"},
        ["e.yaml"],
        ["model.name", "ViT-Nope", "clipray-tiny-vit"],
    ),
    (
        "unknown-data-kind",
        {"e.yaml": "data: {kind: parquet}\n"},
        ["e.yaml"],
        ["data", "kind", "parquet", "csv"],
    ),
    (
        "missing-data-file",
        {"e.yaml": "data: {kind: csv, train: t.csv, val: t.csv}\n"},
        ["e.yaml"],
        ["data.train", "file not found", "t.csv"],
    ),
    ("missing-experiment", {}, ["nope.yaml"], ["nope.yaml", "file not found"]),
    (
        "bad-set",
        {"e.yaml": EXP},
        ["e.yaml", "--set", "perturb.layer"],
        ["perturb.layer", "section.key=value"],
    ),
]
BAD_SPACES = [
    (
        "empty-space",
        {"search_spaces/s.yaml": ""},
        ["search_spaces/s.yaml"],
        ["s.yaml", "empty search space"],
    ),
    (
        "empty-space-of-a-sweep",
        {"e.yaml": "sweep: {space: s.yaml}\n", "s.yaml": "# none\n"},
        ["e.yaml"],
        ["s.yaml", "empty search space"],
    ),
    (
        "no-such-path",
        {"s.yaml": "perturb.strength: {type: uniform, low: 0, high: 1}\n"},
        ["s.yaml"],
        ["perturb.strength", "no such config field"],
    ),
    (
        "low-above-high",
        {"s.yaml": "perturb.epsilon: {type: uniform, low: 0.5, high: 0.1}\n"},
        ["s.yaml"],
        ["perturb.epsilon", "low (0.5) must be below high (0.1)"],
    ),
    (
        "int-low-above-high",
        {"s.yaml": "perturb.layer: {type: int, low: 3, high: 0}\n"},
        ["s.yaml"],
        ["perturb.layer", "low (3) must not exceed high (0)"],
    ),
    (
        "space-value-out-of-range",
        {"s.yaml": "perturb.layer: {type: int, low: 0, high: 4}\n"},
        ["s.yaml"],
        ["perturb.layer=4 is invalid"],
    ),
    (
        "space-missing-type",
        {"s.yaml": "perturb.layer: {low: 0, high: 3}\n"},
        ["s.yaml"],
        ["perturb.layer", "type"],
    ),
    (
        "space-of-a-sweep-missing",
        {"e.yaml": "sweep: {space: gone.yaml}\n"},
        ["e.yaml"],
        ["sweep.space", "gone.yaml"],
    ),
]


def _run_bad(tmp_path, monkeypatch, capsys, files, argv, words, command):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    extra = ["--out", "out", "--quiet"] if command == "train" else []
    code = main([command, *argv, *extra])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("clipray: error: ")
    for word in words:
        assert word in err, (word, err)
    assert out == ""
    assert _files(tmp_path) == before  # nothing written: no output dir, no stray files


@pytest.mark.parametrize(
    ("files", "argv", "words"),
    [c[1:] for c in BAD + BAD_SPACES],
    ids=[c[0] for c in BAD + BAD_SPACES],
)
def test_check_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path, monkeypatch, capsys, files, argv, words
):
    _run_bad(tmp_path, monkeypatch, capsys, files, argv, words, "check")


@pytest.mark.parametrize(("files", "argv", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_train_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path, monkeypatch, capsys, files, argv, words
):
    _run_bad(tmp_path, monkeypatch, capsys, files, argv, words, "train")


def test_train_bad_batch_size_writes_nothing(tmp_path, monkeypatch, capsys):
    """A config problem found while building the run (batch larger than the data) is still bad
    input: one line, exit 2, and no half-made run directory left behind."""
    files = {"e.yaml": EXP}
    argv = ["e.yaml", *_sets([*TINY, "data.train_size=8"])]
    _run_bad(tmp_path, monkeypatch, capsys, files, argv, ["train.batch_size", "8"], "train")


def test_train_with_a_truncated_checkpoint_fails_clearly(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    data = tiny_checkpoint.path.read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    files = {"e.yaml": f"model: {{pretrained: {tmp_path / 'w.pt'}}}\n"}
    argv = ["e.yaml", *_sets(TINY)]
    _run_bad(tmp_path, monkeypatch, capsys, files, argv, ["w.pt", "cannot be read"], "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_refuses_gpu_when_there_is_none(tmp_path, monkeypatch, capsys):
    argv = ["e.yaml", "--set", "train.use_gpu=yes"]
    _run_bad(tmp_path, monkeypatch, capsys, {"e.yaml": EXP}, argv, ["train.use_gpu"], "train")


# ------------------------------------------------------------------------------------ training
def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _deterministic(line: dict) -> dict:
    """A metrics line without its timings (wall clock differs between runs)."""
    return {
        k: v
        for k, v in line.items()
        if k not in ("train/samples_per_s", "train/resumed_from_step") and not k.startswith("time/")
    }


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted ``clipray train`` of the shipped default sweep, shrunk; run once
    (module-scoped, so its output is captured here rather than by the function-scoped capsys)."""
    root = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["train", str(DEFAULT_SWEEP), "--set", "name=cli-test", *_sets(RUN)])
    return {
        "code": code,
        "dir": root / "runs" / "cli-test" / "train",
        "root": root,
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
    }


def test_train_writes_checkpoint_metrics_and_config(straight_run):
    assert straight_run["code"] == 0, straight_run["stderr"]
    run = straight_run["dir"]  # default --out: <storage>/<name>/train under the cwd
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
    ]
    exp = load_experiment(DEFAULT_SWEEP, ["name=cli-test", *RUN])
    assert yaml.safe_load((run / "config.yaml").read_text()) == exp.to_dict()
    blob = load_checkpoint(run / "checkpoint.pt")
    assert blob["step"] == 8 and blob["config"] == exp.to_dict()
    lines = _metric_lines(run / "metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    assert [line["epoch"] for line in lines] == [0.5, 1.0, 1.5, 2.0]
    assert ["val/rsum" in line for line in lines] == [False, True, False, True]


def test_train_shows_progress_and_ends_with_clean_val_recall(straight_run):
    assert "8/8" in straight_run["stderr"] and "step" in straight_run["stderr"]  # tqdm bar
    stdout = straight_run["stdout"].strip().splitlines()
    assert [line.split(":")[0] for line in stdout[:-1]] == ["epoch 1", "epoch 2"]
    final = json.loads(stdout[-1])
    last = _metric_lines(straight_run["dir"] / "metrics.jsonl")[-1]
    expected = {k: round(v, 3) for k, v in last.items() if k.startswith("val/")}
    assert final == expected
    assert set(final) >= {
        "val/rsum",
        "val/i2t_R1",
        "val/i2t_R5",
        "val/i2t_R10",
        "val/t2i_R1",
        "val/t2i_R5",
        "val/t2i_R10",
    }
    assert 0 <= final["val/rsum"] <= 600


def test_the_checkpoint_loads_as_pretrained_weights(straight_run):
    ckpt = straight_run["dir"] / "checkpoint.pt"
    exp = load_experiment(DEFAULT_SWEEP, [f"model.pretrained={ckpt}"])
    model = build_model(exp.model).model
    expected = _weights(ckpt)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(DEFAULT_SWEEP),
        "--set",
        "name=cli-test",
        *_sets(RUN),
        "--out",
        str(run_dir),
        *extra,
    ]


def test_train_refuses_to_overwrite_an_existing_run(straight_run, capsys):
    run = straight_run["dir"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(_train_args(run, "--quiet")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and str(run) in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_refuses_a_changed_config_and_an_empty_directory(straight_run, tmp_path, capsys):
    run = straight_run["dir"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main([*_train_args(run, "--resume", "--quiet"), "--set", "train.lr=0.002"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different config" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert main(_train_args(tmp_path / "empty", "--resume", "--quiet")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err
    assert not (tmp_path / "empty").exists()


def test_resuming_a_finished_run_changes_nothing_and_reports_its_recall(
    straight_run, tmp_path, capsys
):
    run = tmp_path / "copy"
    shutil.copytree(straight_run["dir"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(_train_args(run, "--resume", "--quiet")) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert final == json.loads(straight_run["stdout"].strip().splitlines()[-1])


def test_an_interrupted_run_resumes_to_the_same_weights(
    straight_run, tmp_path, monkeypatch, capsys
):
    """Ctrl-C after step 6 (checkpoint at 6 on disk); then the step-4 checkpoint is put back, as
    if the last save had been lost, so resuming must also drop the metrics line of step 6."""
    run = tmp_path / "run"
    saved = tmp_path / "step4.pt"
    real_on_step = clipray.cli.train._FileHooks.on_step

    def on_step(self, step, metrics):
        real_on_step(self, step, metrics)
        if step == 5:  # the step-4 checkpoint is complete on disk
            shutil.copy(run / "checkpoint.pt", saved)
        if step == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(clipray.cli.train._FileHooks, "on_step", on_step)
    assert main(_train_args(run, "--quiet")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6
    assert [line["step"] for line in _metric_lines(run / "metrics.jsonl")] == [2, 4, 6]
    monkeypatch.setattr(clipray.cli.train._FileHooks, "on_step", real_on_step)

    shutil.copy(saved, run / "checkpoint.pt")
    assert main(_train_args(run, "--resume")) == 0
    out, err = capsys.readouterr()
    assert "4/8" in err and "8/8" in err  # the bar starts where the checkpoint left off

    straight = straight_run["dir"]
    a, b = _weights(straight / "checkpoint.pt"), _weights(run / "checkpoint.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_checkpoint(straight / "checkpoint.pt")["optimizer"]["state"]
    sb = load_checkpoint(run / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    resumed = [_deterministic(x) for x in _metric_lines(run / "metrics.jsonl")]
    assert resumed == [_deterministic(x) for x in _metric_lines(straight / "metrics.jsonl")]
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(
        straight_run["stdout"].strip().splitlines()[-1]
    )


def test_quiet_train_prints_no_bar(tmp_path, capsys):
    args = [
        "train",
        str(DEFAULT_SWEEP),
        *_sets([*TINY, "train.epochs=1"]),
        "--out",
        str(tmp_path / "q"),
        "--quiet",
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert set(json.loads(out.strip().splitlines()[-1])) >= {"val/rsum"}
