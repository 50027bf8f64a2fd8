"""The sweep: search pieces, bad input before any trial, a SIGKILL + resume end to end, and the
same command on a two-node cluster."""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Categorical, Float, Integer

from clipray.cli.main import main
from clipray.cli.sweep import sweep_inputs
from clipray.config.errors import ConfigError
from clipray.config.space import parse_space
from clipray.sweep import search
from clipray.sweep.manifest import MANIFEST
from clipray.sweep.search import (
    BASELINE_KEY,
    BaselineFirst,
    PairedSeeds,
    baseline_point,
    make_scheduler,
    make_searcher,
    mean_result,
    objectives,
    tune_space,
)
from clipray.sweep.tracking import PARENT_TAG, SWEEP_TAG, TRIAL_TAG
from clipray.sweep.trial import trial_experiment
from tests.conftest import small_experiment
from tests.e2e import BIN, child_runs, free_port, tiny_sweep

REPO = Path(__file__).resolve().parent.parent

SPACE = {
    "perturb.layer": {"type": "int", "low": 0, "high": 3},
    "perturb.epsilon": {"type": "loguniform", "low": 0.05, "high": 1.0},
    "perturb.steps": {"type": "choice", "values": [1, 2]},
    "perturb.norm": {"type": "grid", "values": ["linf", "l2"]},
    "perturb.adv_weight": {"type": "uniform", "low": 0.2, "high": 0.8},
}
GRID = {"perturb.norm": SPACE["perturb.norm"], "perturb.steps": SPACE["perturb.steps"]}
GRID_POINTS = sorted(itertools.product(["linf", "l2"], [1, 2]))
STUDY = "test-study"


# ------------------------------------------------------------------------------ search pieces


def test_quiet_logs_names_ray_trains_own_loggers():
    """Ray Train names some loggers after their file; a rename upstream would unmute them."""
    from ray.train.v2._internal.execution import context
    from ray.train.v2._internal.execution.controller import placement_group_cleaner

    from clipray.sweep.ray_worker import NOISY

    assert set(NOISY) == {context.logger.name, placement_group_cleaner.logger.name}


def test_ray_workers_name_the_cluster_they_belong_to():
    """A sweep started here (no RAY_ADDRESS) gives its Ray workers RAY_ADDRESS = its own GCS,
    so Ray's state API in them (the placement-group cleaner) never auto-detects another Ray
    instance on the same machine."""
    code = (
        "import os, ray\n"
        "from clipray.sweep.runtime import init_ray\n"
        "init_ray()\n"
        "seen = ray.get(ray.remote(lambda: os.environ.get('RAY_ADDRESS')).remote())\n"
        "print(seen == ray.get_runtime_context().gcs_address, seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [BIN / "python", "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "True", done.stdout


def test_space_becomes_tune_distributions():
    space = tune_space(parse_space(SPACE, "s.yaml"))
    assert isinstance(space["perturb.layer"], Integer)
    assert isinstance(space["perturb.epsilon"], Float)
    assert isinstance(space["perturb.steps"], Categorical)
    assert isinstance(space["perturb.norm"], Categorical)
    layers = {space["perturb.layer"].sample() for _ in range(400)}
    assert layers == {0, 1, 2, 3}  # inclusive upper bound
    eps = [space["perturb.epsilon"].sample() for _ in range(400)]
    assert 0.05 <= min(eps) and max(eps) <= 1.0


def _tell(searcher, trial_id: str, value: float) -> None:
    searcher.on_trial_result(trial_id, {"epoch": 1.0, "train/loss": 1.0})  # an epoch report
    searcher.on_trial_complete(trial_id, {"agg/mean_corrupted_rsum": value})


def _searcher(exp, space, storage: optuna.storages.BaseStorage | None = None) -> BaselineFirst:
    """``make_searcher``'s searcher, ready to suggest. With ``storage``, its Optuna study is kept
    there (OptunaSearch's public ``storage`` argument), where ``optuna.load_study`` reads it."""
    with pytest.MonkeyPatch.context() as mp:
        if storage is not None:
            with_storage = functools.partial(OptunaSearch, storage=storage, study_name=STUDY)
            mp.setattr(search, "OptunaSearch", with_storage)
        searcher = make_searcher(exp, space)
    assert searcher.set_search_properties(None, None, tune_space(space))
    return searcher


def _optuna_trials(storage: optuna.storages.BaseStorage) -> list:
    return optuna.load_study(study_name=STUDY, storage=storage).trials


def test_baseline_comes_first_and_optuna_never_sees_it(tmp_path):
    exp = small_experiment()
    space = parse_space(SPACE, "s.yaml")
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(exp, space, storage)
    first = searcher.suggest("t0")
    assert first[BASELINE_KEY] is True and first["perturb.epsilon"] == 0.0
    assert set(SPACE) <= set(first)  # every searched path has a value (Tune fills gaps otherwise)
    assert not trial_experiment(exp.to_dict(), first).perturb.active
    _tell(searcher, "t0", 100.0)
    for i in (1, 2):
        config = searcher.suggest(f"t{i}")
        assert BASELINE_KEY not in config and 0.05 <= config["perturb.epsilon"] <= 1.0
        _tell(searcher, f"t{i}", 50.0 + i)
    assert [t.value for t in _optuna_trials(storage)] == [51.0, 52.0]  # the baseline is not there

    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)
    restored = _searcher(exp, space)
    restored.restore(path)
    assert restored.baseline_trial == "t0"
    resumed = restored.suggest("t3")
    assert BASELINE_KEY not in resumed  # no second baseline after a resume
    assert resumed == searcher.suggest("t3")  # Optuna goes on as if never interrupted


def test_paired_seeds_run_every_arm_per_seed_and_optuna_sees_their_mean(tmp_path):
    """seeds=3: each configuration (the baseline too) comes three times in a row with seeds
    0, 1, 2 of the file's seed; Optuna hears of it once, with the mean, after its last seed."""
    exp = small_experiment("seed=10", "sweep.seeds=3")
    space = parse_space(SPACE, "s.yaml")
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(exp, space, storage)
    assert isinstance(searcher, PairedSeeds) and isinstance(searcher.inner, BaselineFirst)
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["seed"] for c in configs] == [10, 11, 12]
    assert all(c[BASELINE_KEY] for c in configs)
    assert [trial_experiment(exp.to_dict(), c).seed for c in configs] == [10, 11, 12]
    for i in range(3):
        _tell(searcher, f"t{i}", 100.0 + i)
    arm = [searcher.suggest(f"t{i}") for i in range(3, 6)]
    assert BASELINE_KEY not in arm[0] and [c["seed"] for c in arm] == [10, 11, 12]
    same = [{k: v for k, v in c.items() if k != "seed"} for c in arm]
    assert same[0] == same[1] == same[2]  # one configuration, three seeds
    _tell(searcher, "t3", 40.0)
    _tell(searcher, "t4", 50.0)
    assert _optuna_trials(storage)[0].state == optuna.trial.TrialState.RUNNING  # a seed to go
    _tell(searcher, "t5", 90.0)
    assert [t.value for t in _optuna_trials(storage)] == [60.0]  # the mean, once
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)
    restored = _searcher(exp, space)
    restored.restore(path)
    assert restored.suggest("t6") == searcher.suggest("t6")  # a new arm, seed 10, as before


def test_a_seed_without_its_objective_prunes_its_configuration():
    exp = small_experiment("sweep.seeds=2", "sweep.baseline=false")
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(exp, parse_space(SPACE, "s.yaml"), storage)
    searcher.suggest("a"), searcher.suggest("b")
    _tell(searcher, "a", 10.0)
    searcher.on_trial_complete("b", {"early_stopped": 1.0})  # stopped by ASHA: no objective
    assert _optuna_trials(storage)[0].state == optuna.trial.TrialState.PRUNED
    assert mean_result([{"x": 1.0, "y": "s"}, {"x": 3.0}]) == {"x": 2.0}
    assert mean_result([{"x": 1.0}, None]) is None


def test_a_restored_searcher_keeps_optunas_history(tmp_path):
    """Resumed, the search goes on where it was. With the grid sampler that is visible in the
    suggestions: the restored searcher proposes exactly the points Optuna has not tried yet."""
    exp = small_experiment("sweep.searcher.sampler=grid")
    space = parse_space(GRID, "s.yaml")

    def point(config: dict) -> tuple:
        assert BASELINE_KEY not in config
        return config["perturb.norm"], config["perturb.steps"]

    searcher = _searcher(exp, space)
    assert BASELINE_KEY in searcher.suggest("t0")
    _tell(searcher, "t0", 100.0)
    tried = []
    for i in (1, 2):
        tried.append(point(searcher.suggest(f"t{i}")))
        _tell(searcher, f"t{i}", 50.0 + i)
    path = str(tmp_path / "searcher.pkl")
    searcher.save(path)
    restored = _searcher(exp, space)
    restored.restore(path)
    rest = [point(restored.suggest(f"t{i}")) for i in (3, 4)]
    assert sorted(tried + rest) == GRID_POINTS  # every point once: none repeated
    forgetful = _searcher(exp, space)  # what a searcher without that history would do
    forgetful.suggest("t0")
    assert point(forgetful.suggest("t1")) == tried[0]  # it would start the grid over


def test_without_baseline_optuna_suggests_from_the_start():
    exp = small_experiment("sweep.baseline=false")
    space = parse_space(SPACE, "s.yaml")
    searcher = make_searcher(exp, space)
    searcher.set_search_properties(None, None, tune_space(space))
    assert BASELINE_KEY not in searcher.suggest("t0")


def test_multi_objective_and_samplers():
    exp = small_experiment("sweep.searcher.multi_objective=true", "sweep.searcher.sampler=nsga2")
    assert objectives(exp) == (["clean/rsum", "agg/mean_corrupted_rsum"], ["max", "max"])
    searcher = make_searcher(exp, parse_space(SPACE, "s.yaml"))
    assert isinstance(searcher, BaselineFirst) and isinstance(searcher.inner, OptunaSearch)
    assert searcher.metric == ["clean/rsum", "agg/mean_corrupted_rsum"]
    storage = optuna.storages.InMemoryStorage()
    searcher = _searcher(exp, parse_space(SPACE, "s.yaml"), storage)
    assert BASELINE_KEY in searcher.suggest("t0")
    for trial_id in ("t1", "t2", "t3"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("t1", {"clean/rsum": 300.0, "agg/mean_corrupted_rsum": 200.0})
    searcher.on_trial_complete("t2", {"epoch": 1.0, "early_stopped": 1.0})  # stopped by ASHA
    searcher.on_trial_complete("t3", None, error=True)
    states = [t.state.name for t in _optuna_trials(storage)]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]  # none left RUNNING
    grid = small_experiment("sweep.searcher.sampler=grid")
    with pytest.raises(ValueError, match="choice/grid params only"):
        make_searcher(grid, parse_space(SPACE, "s.yaml"))
    make_searcher(grid, parse_space(GRID, "s.yaml"))


def _stub_trial(**config):
    from ray.tune.experiment import Trial

    return Trial("run_trial", config=config, stub=True)


def test_asha_is_built_from_the_config(tmp_path):
    """ASHA's settings, read from its decisions (CooperativeASHA turns a stop into a marker
    file): it compares trials on val/rsum, higher is better, at the epochs their results carry,
    and train.epochs is the end of training."""
    from clipray.sweep.search import stop_marker_path

    fifo = make_scheduler(small_experiment(), str(tmp_path))
    assert not isinstance(fifo, tune.schedulers.ASHAScheduler)
    exp = small_experiment("sweep.asha.enabled=true", "train.epochs=4")
    asha = make_scheduler(exp, str(tmp_path))
    assert isinstance(asha, tune.schedulers.ASHAScheduler) and asha.metric == "val/rsum"

    def stopped_at(epoch: float) -> list[str]:
        """A strong trial, then a weak one, report at ``epoch``: which of them are stopped."""
        trials = {"strong": _stub_trial(), "weak": _stub_trial()}
        for value, trial in zip((90.0, 10.0), trials.values(), strict=True):
            asha.on_trial_add(None, trial)
            asha.on_trial_result(None, trial, {"epoch": epoch, "val/rsum": value})
        marked = {n: Path(stop_marker_path(str(tmp_path), t.trial_id)) for n, t in trials.items()}
        return [name for name, marker in marked.items() if marker.exists()]

    assert stopped_at(1.0) == ["weak"]  # the first rung, on the "epoch" of a result
    assert stopped_at(2.0) == ["weak"]  # a later rung: training is not over at epoch 2
    assert stopped_at(4.0) == []  # epoch 4 = train.epochs: over; only scoring is left


def test_baseline_point_keeps_the_files_values():
    exp = small_experiment("perturb.layer=2", "perturb.steps=3")
    point = baseline_point(exp, parse_space(SPACE, "s.yaml"))
    assert point["perturb.layer"] == 2 and point["perturb.steps"] == 3
    assert point["perturb.epsilon"] == 0.0


# ------------------------------------------------------------------------------- bad input
def _sweep_file(tmp_path: Path, storage: Path, **sections) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"perturb.epsilon": SPACE["perturb.epsilon"]}))
    raw = {"name": "s", "storage": str(storage), "sweep": {"space": str(space)}, **sections}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _fails(capsys, argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def test_unwritable_storage_fails_before_anything(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _fails(
        capsys, ["sweep", str(_sweep_file(tmp_path, blocker / "sub"))], "storage", "cannot write"
    )


def test_unreachable_tracking_server_fails_before_anything(tmp_path, capsys):
    storage = tmp_path / "runs"
    file = _sweep_file(tmp_path, storage, tracking={"uri": f"http://127.0.0.1:{free_port()}"})
    _fails(capsys, ["sweep", str(file)], "tracking.uri", "unreachable")
    assert not (storage / "s").exists()


def test_bad_search_spaces_fail_before_anything(tmp_path, capsys):
    file = _sweep_file(tmp_path, tmp_path / "runs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"perturb.nope": {"type": "choice", "values": [1]}}))
    _fails(
        capsys, ["sweep", str(file), "--space", str(bad)], "perturb.nope", "no such config field"
    )
    bad.write_text(yaml.safe_dump({"perturb.epsilon": {"type": "uniform", "low": 1, "high": 0}}))
    _fails(capsys, ["sweep", str(file), "--space", str(bad)], "perturb.epsilon", "low")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["sweep.metric=agg/mean_corupted_rsum"], ["sweep.metric", "agg/mean_corrupted_rsum"]),
        (["sweep.metric=agg/mce", "sweep.baseline=false"], ["sweep.metric", "baseline"]),
        (["sweep.metric=corrupt/fog/s4/rsum", "eval.severities=[1,3]"], ["sweep.metric"]),
        (["sweep.asha.enabled=true", "sweep.asha.metric=train/loss"], ["asha.metric", "val/rsum"]),
        (["sweep.searcher.sampler=grid"], ["sweep.searcher.sampler", "grid"]),
    ],
)
def test_bad_objectives_and_samplers_fail_before_anything(tmp_path, capsys, sets, words):
    storage = tmp_path / "runs"
    argv = ["sweep", str(_sweep_file(tmp_path, storage)), *[a for x in sets for a in ("--set", x)]]
    _fails(capsys, argv, *words)
    assert not storage.exists()


def test_an_unusable_tracking_uri_is_one_line(tmp_path, capsys):
    storage = tmp_path / "runs"
    file = _sweep_file(tmp_path, storage, tracking={"uri": "htp://typo:5000"})
    _fails(capsys, ["sweep", str(file)], "tracking.uri", "htp://typo:5000")
    assert not (storage / "s").exists()


def test_resources_for_the_pool_and_one_trial():
    from clipray.sweep.runtime import check_resources

    exp = small_experiment("eval.scorers.num_actors=2", "eval.scorers.cpus_per_actor=0.5")
    with pytest.raises(
        ConfigError, match=r"\(2 x 0.5 CPU\).*need 2.1 CPUs; this Ray cluster has 2"
    ):
        check_resources(exp, {"CPU": 2.0}, local=True)  # pool 1 + trial driver 0.1 + 1 worker
    check_resources(exp, {"CPU": 2.1}, local=True)
    gpu = small_experiment("train.use_gpu=yes", "train.num_workers=2", "train.batch_size=16")
    with pytest.raises(ConfigError, match=r"train.use_gpu.*need 2 GPUs; this Ray cluster has 1"):
        check_resources(gpu, {"CPU": 8.0, "GPU": 1.0}, local=True)
    check_resources(gpu, {"CPU": 8.0, "GPU": 2.0}, local=True)
    pool = small_experiment("eval.scorers.gpus_per_actor=1")
    with pytest.raises(ConfigError, match="gpus_per_actor.*need 2 GPUs"):
        check_resources(pool, {"CPU": 8.0}, local=True)
    check_resources(pool, {"CPU": 8.0}, local=False)  # a cluster may still grow: a warning


def test_scoring_metric_names_are_those_a_result_holds():
    from clipray.scoring.plan import result_keys

    exp = small_experiment("eval.corruptions=[fog,snow]", "eval.severities=[1,5]")
    keys = set(result_keys(exp.eval, reference=True))
    assert {"clean/rsum", "clean/i2t_R1", "corrupt/snow/s5/t2i_R10", "agg/mce"} <= keys
    assert {"agg/mean_corrupted_rsum", "agg/ce/fog", "agg/relative_mce"} <= keys
    assert "corrupt/fog/s3/rsum" not in keys and "agg/ce/frost" not in keys
    assert not {"agg/mce", "agg/relative_mce"} & set(result_keys(exp.eval, reference=False))


@pytest.mark.slow
def test_a_sweep_that_cannot_fit_on_this_machine_writes_nothing(tmp_path):
    storage = tmp_path / "runs"
    file = _sweep_file(tmp_path, storage)
    done = subprocess.run(
        [str(BIN / "clipray"), "sweep", str(file), "--set", "train.cpus_per_worker=8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "need 9.1 CPUs" in done.stderr.splitlines()[-1]
    assert not (storage / "s").exists()  # no manifest, so the fixed config can simply rerun
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    assert not [
        r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
    ]


def test_resume_finds_a_relative_storage_from_anywhere(tmp_path, monkeypatch):
    from clipray.sweep.manifest import check_destination, load_plan, start_plan

    monkeypatch.chdir(tmp_path)
    file = _sweep_file(tmp_path, Path("runs"))  # storage: runs, relative to where it started
    exp, space = sweep_inputs(str(file), [], None)
    assert check_destination(exp, space, resume=False) is None
    plan = start_plan(exp, space)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exp2, space2 = load_plan(str(tmp_path / "runs" / "s"))
    assert exp2.storage == str(tmp_path / "runs")
    again = check_destination(exp2, space2, resume=True)
    assert again is not None and again.sweep_id == plan.sweep_id
    assert again.directory == plan.directory == str(tmp_path / "runs" / "s")
    assert not (elsewhere / "runs").exists()


def test_local_tracking_stores_are_absolute(tmp_path, monkeypatch):
    from clipray.sweep.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_uri(small_experiment("storage=~/r")) == (
        f"sqlite:///{tmp_path / 'home' / 'r' / 'mlflow.db'}"
    )
    rel = small_experiment("tracking.uri=sqlite:///m.db")
    assert resolve_uri(rel) == f"sqlite:///{tmp_path / 'm.db'}"  # trials run in other cwds
    assert resolve_uri(small_experiment("tracking.uri=http://h:5000")) == "http://h:5000"


def test_resume_needs_a_sweep_of_the_same_config(tmp_path, capsys):
    storage = tmp_path / "runs"
    file = _sweep_file(tmp_path, storage)
    _fails(capsys, ["sweep", str(file), "--resume"], "not a clipray sweep")
    _fails(capsys, ["resume", str(tmp_path)], "not a clipray sweep")
    # A sweep directory made with another config: refused, and left exactly as it was.
    sweep_dir = storage / "s"
    sweep_dir.mkdir(parents=True)
    manifest = sweep_dir / MANIFEST
    manifest.write_text(
        '{"sweep_id": "s-1", "experiment": {"name": "s"}, "space": {}, "tracking": '
        '{"uri": "sqlite:///x.db", "experiment_id": "1", "parent_run_id": "r"}}'
    )
    before = manifest.read_text()
    _fails(capsys, ["sweep", str(file), "--resume"], "different config")
    _fails(capsys, ["sweep", str(file)], "already there", "--resume")
    assert manifest.read_text() == before and sorted(sweep_dir.iterdir()) == [manifest]
    manifest.write_text('{"sweep_id": "s-1"}')  # damaged: one line, not a KeyError traceback
    _fails(capsys, ["sweep", str(file), "--resume"], "not a clipray sweep manifest")
    _fails(capsys, ["resume", str(sweep_dir)], "not a clipray sweep manifest")


# ------------------------------------------------------------- kill -9 mid-trial, then resume
# The resume test: two trials (the kill lands in the second; 16 steps per epoch leave it time).
RESUME_TRIALS, RESUME_SAMPLES = 2, 512


def _sweep_command(tmp_path: Path, uri: str, *extra: str) -> list[str]:
    return [
        *tiny_sweep(
            tmp_path,
            "name=resume-test",
            f"storage={tmp_path / 'runs'}",
            f"tracking.uri={uri}",
            f"sweep.num_samples={RESUME_TRIALS}",
            f"data.train_size={RESUME_SAMPLES}",
            "train.epochs=3",
        ),
        *extra,
    ]


def _kill_mid_training(proc: subprocess.Popen, client: MlflowClient, steps_per_epoch: int) -> None:
    """SIGKILL the driver once the second trial has finished its first epoch (not its last)."""
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        runs = child_runs(client)
        if len(runs) >= 2:
            second = max(runs, key=lambda r: r.info.start_time)
            steps = [m.step for m in client.get_metric_history(second.info.run_id, "train/loss")]
            if steps_per_epoch in steps:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                time.sleep(3)  # let Ray notice its driver is gone, then clear what is left
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
        time.sleep(0.3)
    out = proc.stdout.read() if proc.poll() is not None else ""
    proc.kill()
    pytest.fail(f"never reached the second trial's first epoch:\n{out[-3000:]}")


@pytest.mark.slow
def test_sigkilled_sweep_resumes_to_exactly_its_trials(tmp_path, mlflow_server):
    client = MlflowClient(mlflow_server)
    steps_per_epoch = RESUME_SAMPLES // 32  # TINY_SWEEP's batch size
    proc = subprocess.Popen(
        _sweep_command(tmp_path, mlflow_server),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _kill_mid_training(proc, client, steps_per_epoch)
    killed = {r.data.tags[TRIAL_TAG] for r in child_runs(client) if r.info.status != "FINISHED"}
    assert killed, "the kill should land inside a trial"

    resumed = subprocess.run(
        _sweep_command(tmp_path, mlflow_server, "--resume"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"finished: {RESUME_TRIALS} trials" in resumed.stdout
    assert "Reporting training result" not in resumed.stdout + resumed.stderr  # quiet_logs works

    exp_id = client.get_experiment_by_name("clipray").experiment_id
    parents = [r for r in client.search_runs([exp_id]) if SWEEP_TAG in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = child_runs(client)
    trial_ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(children) == RESUME_TRIALS == len(set(trial_ids))  # none duplicated
    expected_steps = [steps_per_epoch * e for e in (1, 2, 3)]
    for run in children:
        assert run.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/rsum"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == expected_steps, (run.info.run_name, key, steps)  # no gap, no repeat
        for key in ("agg/mean_corrupted_rsum", "clean/rsum", "corrupt/fog/s1/rsum", "agg/mce"):
            assert key in run.data.metrics, (run.info.run_name, key)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"rsum_heatmap.png", "metrics.csv", "config.yaml", "checkpoint.txt"} <= artifacts
    # The killed trial continued from its checkpoint instead of starting over.
    for run in children:
        if run.data.tags[TRIAL_TAG] in killed:
            assert run.data.metrics.get("train/resumed_from_step", 0) >= steps_per_epoch
    baseline = [r for r in children if r.info.run_name.endswith("baseline")]
    assert len(baseline) == 1 and baseline[0].data.metrics["agg/mce"] == pytest.approx(100.0)
    sweep_dir = tmp_path / "runs" / "resume-test"
    assert (sweep_dir / "best_config.yaml").exists() and (sweep_dir / MANIFEST).exists()
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 1 + RESUME_TRIALS
    grid = tune.ExperimentAnalysis(str(sweep_dir))
    assert len(grid.trials) == RESUME_TRIALS
    assert all(t.status == "TERMINATED" for t in grid.trials)


def test_asha_stops_cooperatively_and_never_the_baseline_or_a_finished_trial(tmp_path):
    """ASHA's stops become marker files the trials' workers read (Tune never kills a trial in
    the middle of its Ray Train run); the baseline and trials past their last epoch are kept."""
    from ray.tune.schedulers import TrialScheduler

    from clipray.sweep.search import stop_marker_path

    exp = small_experiment("sweep.asha.enabled=true", "train.epochs=4", "sweep.asha.grace_period=1")
    scheduler = make_scheduler(exp, str(tmp_path))
    others = [_stub_trial(**{"perturb.epsilon": 0.1}) for _ in range(5)]
    baseline = _stub_trial(**{BASELINE_KEY: True})
    decisions = []
    for value, t in zip([90, 80, 70, 60, 50, 1.0], [*others, baseline], strict=True):
        scheduler.on_trial_add(None, t)  # results arrive best first; the baseline is the worst
        decisions.append(scheduler.on_trial_result(None, t, {"epoch": 1.0, "val/rsum": value}))
    assert set(decisions) == {TrialScheduler.CONTINUE}
    stopped = {
        t.trial_id for t in others if Path(stop_marker_path(str(tmp_path), t.trial_id)).exists()
    }
    assert stopped and others[0].trial_id not in stopped  # weak perturbed trials, not the best
    assert not Path(stop_marker_path(str(tmp_path), baseline.trial_id)).exists()
    # At the last epoch (a rung when max_t is a power of the reduction factor) nobody is stopped:
    # training is over and the trial still has to be scored.
    late = _stub_trial(**{"perturb.epsilon": 0.2})
    scheduler.on_trial_add(None, late)
    for value, t in zip([90, 80, 1.0], [others[0], others[1], late], strict=True):
        scheduler.on_trial_result(None, t, {"epoch": 4.0, "val/rsum": value})
    assert not Path(stop_marker_path(str(tmp_path), late.trial_id)).exists()


# ------------------------------------------------------------ the same command on a cluster
@pytest.mark.slow
def test_sweep_joins_a_two_node_cluster_and_trains_across_it(tmp_path):
    """``clipray sweep`` with RAY_ADDRESS set runs on that cluster: each trial's two Train
    workers (1.5 CPUs each) cannot share a 2-CPU node, so every trial trains across both."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        cluster.wait_for_nodes()
        command = tiny_sweep(
            tmp_path,
            "name=cluster-test",
            f"storage={tmp_path / 'runs'}",  # one filesystem: every simulated node reaches it
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "sweep.num_samples=2",
            "data.train_size=128",
            "train.epochs=1",
            "train.num_workers=2",
        )
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env={**os.environ, "RAY_ADDRESS": cluster.address},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert "finished: 2 trials" in done.stdout

        ray.init(address=cluster.address, log_to_driver=False)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        nodes_per_run: dict[str, set[str]] = {}
        for actor in workers:
            nodes_per_run.setdefault(actor.placement_group_id, set()).add(actor.node_id)
        assert len(nodes_per_run) == 2, nodes_per_run  # one Train run per trial
        assert all(len(nodes) == 2 for nodes in nodes_per_run.values()), nodes_per_run
    finally:
        ray.shutdown()
        cluster.shutdown()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = child_runs(client)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all("agg/mean_corrupted_rsum" in r.data.metrics for r in children)


def test_an_incomplete_sweep_says_how_to_continue_it():
    from clipray.sweep.report import SweepSummary, closing_lines

    done = SweepSummary("s-1", "/r/s", 3, "t2", 250.0, "/r/s/train/t2/c", "sqlite:////r/m.db", 3)
    assert done.complete and closing_lines(done, "m")[0] == "sweep s-1 finished: 3 trials in /r/s"
    cut = SweepSummary("s-1", "/r/s", 1, None, None, None, "http://h:5000", 3)
    failed = SweepSummary("s-1", "/r/s", 3, "t2", 250.0, "/r/s/c", "http://h:5000", 4, failed=1)
    for s, words in ((cut, ["1 of 3"]), (failed, ["3 of 4", "1 failed"])):
        assert not s.complete
        first = closing_lines(s, "m")[0]
        assert "incomplete" in first and "clipray resume /r/s" in first
        assert all(w in first for w in words)


@pytest.mark.slow
def test_ctrl_c_leaves_a_sweep_to_resume_from_anywhere(tmp_path):
    """Tune takes the first Ctrl-C and stops its trials; the sweep then says it is incomplete
    (exit 1, parent run KILLED), and ``clipray resume DIR`` run from another directory
    finishes it (relative storage is found where DIR is)."""
    command = tiny_sweep(
        tmp_path,
        "name=int",
        "storage=runs",  # relative to tmp_path, where the sweep starts
        "sweep.num_samples=1",
        "data.train_size=256",
        "train.epochs=2",
    )
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        runs = child_runs(client) if (tmp_path / "runs" / "mlflow.db").exists() else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-4000:]
    assert "incomplete: 0 of 1 trials finished" in out, out[-4000:]
    exp_id = client.get_experiment_by_name("clipray").experiment_id
    parent = [r for r in client.search_runs([exp_id]) if SWEEP_TAG in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run(
        [str(BIN / "clipray"), "resume", str(tmp_path / "runs" / "int")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "finished: 1 trial in" in resumed.stdout
    assert client.get_run(parent[0].info.run_id).info.status == "FINISHED"
    children = child_runs(client)
    assert len(children) == 1 and all(r.info.status == "FINISHED" for r in children)
    assert not (elsewhere / "runs").exists()


def test_storage_paths_and_uris():
    from clipray.core import storage

    assert storage.join("s3://b/p?region=us-east-1", "s", "m.json") == (
        "s3://b/p/s/m.json?region=us-east-1"  # the query stays the URI's
    )
    assert storage.join("s3://b/p/", "s") == "s3://b/p/s" and storage.is_remote("gs://b")
    assert storage.absolute("file:///tmp/x") == "/tmp/x" and not storage.is_remote("file:///x")
    assert storage.join("file:///tmp/x", "a") == "/tmp/x/a"
    assert storage.absolute("~/r") == str(Path.home() / "r")


def test_the_driver_logs_epochs_once_and_fills_what_a_crash_left_out(tmp_path):
    """Live epoch reports are logged as they come; the trial's last report fills any step that
    never arrived from its checkpoint's history; a replayed step is not logged twice."""
    import json

    from ray.tune.experiment import Trial

    from clipray.sweep.callbacks import EpochsToMlflow
    from clipray.sweep.ray_train import HISTORY_FILE
    from clipray.sweep.tracking import open_sweep

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking = open_sweep(small_experiment(f"tracking.uri={uri}", "name=s"), "s-1")
    trial = Trial("run_trial", config={}, stub=True)
    run_id = tracking.runs().trial(trial.trial_id, "t")
    history = [
        {
            "step": 16 * e,
            "epoch": float(e),
            "train/loss": 3.0 - e,
            "val/rsum": 100.0 * e,
            "data/skipped": float(e),
        }
        for e in (1, 2, 3)
    ]
    checkpoint = tmp_path / "checkpoint_000002"
    checkpoint.mkdir()
    (checkpoint / HISTORY_FILE).write_text(json.dumps(history))
    callback = EpochsToMlflow(tracking, "agg/mean_corrupted_rsum")
    callback.on_trial_result(0, [], trial, history[0])
    callback.on_trial_result(0, [], trial, history[0])  # replayed after a restart
    # (epoch 2's report never reached the driver: it was down)
    callback.on_trial_result(0, [], trial, history[2])
    final = {**history[2], "agg/mean_corrupted_rsum": 200.0, "checkpoint_path": str(checkpoint)}
    callback.on_trial_result(0, [], trial, final)
    client = MlflowClient(uri)
    for key in ("train/loss", "val/rsum", "epoch", "data/skipped"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [16, 32, 48], (key, steps)
    assert "agg/mean_corrupted_rsum" not in client.get_run(run_id).data.metrics  # the trial's


def test_report_lists_every_trial_best_first(tmp_path, monkeypatch, capsys):
    import csv

    from clipray.sweep.manifest import start_plan
    from clipray.sweep.report import REPORT

    monkeypatch.chdir(tmp_path)
    exp, space = sweep_inputs(str(_sweep_file(tmp_path, tmp_path / "runs")), [], None)
    plan = start_plan(exp, space)
    runs = plan.tracking.runs()
    scores = {"t-base": 250.0, "t-strong": 120.0, "t-good": 260.0, "t-stopped": None}
    for trial_id, score in scores.items():
        run_id = runs.trial(trial_id, f"{trial_id} label")
        runs.log_params(run_id, {"perturb.epsilon": 0.1, "train.epochs": 2})
        if score is not None:
            runs.log_metrics(run_id, {"agg/mean_corrupted_rsum": score, "clean/rsum": 300.0}, 9)
    assert main(["report", str(tmp_path / "runs" / "s")]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| t-")]
    assert [line.split()[1] for line in lines] == ["t-good", "t-base", "t-strong", "t-stopped"]
    assert "agg/mean_corrupted_rsum" in out and "| 260 |" in lines[0]
    with open(tmp_path / "runs" / "s" / REPORT, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == ["t-good", "t-base", "t-strong", "t-stopped"]
    assert rows[0]["perturb.epsilon"] == "0.1" and float(rows[0]["clean/rsum"]) == 300.0
    assert rows[-1]["agg/mean_corrupted_rsum"] == "nan"
    assert main(["report", str(tmp_path)]) == 2  # not a sweep: one line


@pytest.mark.slow
def test_paired_seeds_and_the_noise_control_run_end_to_end(tmp_path, monkeypatch):
    """A real sweep: 2 configurations (the baseline, a noise control) x 2 paired seeds. Each
    trial trains with its seed, keeps its per-query ranks (whose RSUM is its logged score), and is
    compared with the baseline of its own seed; results.csv and the report carry arm and seed."""
    import csv

    import numpy as np
    import torch

    from clipray.analysis.stats import rsum_from_ranks
    from clipray.core.checkpoint import load_checkpoint

    space = tmp_path / "space.yaml"
    space.write_text(
        "perturb.kind: {type: choice, values: [noise]}\n"
        "perturb.epsilon: {type: loguniform, low: 0.01, high: 0.02}\n"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cmd = tiny_sweep(
        tmp_path, f"storage={tmp_path / 'runs'}", "name=paired", f"sweep.space={space}",
        "sweep.num_samples=2", "sweep.seeds=2", "seed=5", "data.train_size=64",
    )  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    sweep_dir = tmp_path / "runs" / "paired"
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    arms = {r["arm"] for r in rows}
    assert len(rows) == 4 and len(arms) == 2 and "baseline" in arms
    assert sorted((r["arm"] == "baseline", r["seed"]) for r in rows) == [
        (False, "5"),
        (False, "6"),
        (True, "5"),
        (True, "6"),
    ]
    assert {r["perturb.kind"] for r in rows if r["arm"] != "baseline"} == {"noise"}
    assert (sweep_dir / "baseline_metrics.json").exists()
    assert (sweep_dir / "baseline_metrics-seed6.json").exists()
    for r in rows:
        ranks = np.load(sweep_dir / "ranks" / f"{r['trial_id']}.npz")
        clean = rsum_from_ranks(ranks["clean/i2t"], ranks["clean/t2i"])
        assert clean == pytest.approx(float(r["clean/rsum"]), abs=1e-6)
    base = {r["seed"]: r for r in rows if r["arm"] == "baseline"}
    weights = {  # the seed reaches training (RSUM on 16 test images can tie by chance)
        k: load_checkpoint(max((sweep_dir / "train" / r["trial_id"]).glob("*/checkpoint.pt")))
        for k, r in base.items()
    }
    assert not torch.equal(
        weights["5"]["model"]["text_projection"], weights["6"]["model"]["text_projection"]
    )
    assert (sweep_dir / "report" / "report.html").exists()


@pytest.mark.parametrize(
    "sets, words",
    [
        (["sweep.seeds=3", "sweep.asha.enabled=true"], ["seeds", "asha.enabled", "do not mix"]),
        (["seed=4294967295", "sweep.seeds=2"], ["sweep.seeds", "largest seed"]),
    ],
    ids=["asha-with-seeds", "seed-overflow"],
)
def test_paired_seeds_refuse_what_would_bias_or_break_them(sets, words):
    with pytest.raises(ConfigError) as e:
        small_experiment(*sets)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)


def test_an_arm_is_its_full_values_and_a_run_name_shows_three_digits():
    from clipray.sweep.trial import arm_label, describe

    a, b = {"perturb.epsilon": 0.010012}, {"perturb.epsilon": 0.010049}
    assert arm_label(a) != arm_label(b)  # two sampled epsilons never merge into one arm
    assert describe({**a, "seed": 1}) == "epsilon=0.01, seed=1"
