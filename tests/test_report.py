"""The sweep report: its numbers are the logged metrics (from a sweep directory and from a real
MLflow server), its bootstrap intervals cover at their nominal rate, Holm's correction is the
textbook one, a sweep with nothing (or no baseline, or one seed) to compare says so, and the
calibration section shows results.csv's clean cost and loss gap with its 0-15 % epsilon range."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from clipray.analysis import stats
from clipray.analysis.calibration import (
    ADV_LOSS,
    CLEAN_LOSS,
    NO_LOSSES,
    CalibrationRow,
    CostRange,
    calibration_rows,
    cost_range,
    range_sentences,
)
from clipray.analysis.importance import param_importances
from clipray.analysis.plots import epsilon_ticks
from clipray.analysis.results import CLEAN, CORRUPTED, arm_label, read_results_csv
from clipray.analysis.stats import Design, bootstrap, holm, pareto_front, rsum_from_ranks
from clipray.analysis.study_report import (
    NO_BASELINE,
    NO_INTERVALS,
    NO_RANKS,
    NO_TRIAL,
    ONE_SEED,
    SweepInputs,
    build_report,
)
from clipray.config.corruption_names import FAMILIES
from clipray.scoring.tables import trials_csv
from clipray.sweep.manifest import Plan
from clipray.sweep.tracking import Tracking
from tests.conftest import small_experiment
from tests.sweep_results import ARMS, CELLS, SPACE, npz_bytes, sweep_rows

RESAMPLES = 400  # enough for the checks here; the report's default is stats.RESAMPLES


@pytest.fixture(scope="module")
def sweep():
    """4 arms x 2 seeds: rows as results.csv holds them, and each trial's ranks."""
    return sweep_rows(seeds=(0, 1))


def _inputs(rows, ranks, **change) -> SweepInputs:
    return replace(SweepInputs("s-1", "here", rows, ranks, SPACE), **change)


def _family_rsum(row: dict, family: str) -> float:
    cells = [f"corrupt/{c}/s{s}/rsum" for c, s in CELLS if c in FAMILIES[family]]
    return float(np.mean([row[k] for k in cells]))


def _logged(row: dict, endpoint: str) -> float:
    """What the sweep logged for an endpoint of the report."""
    if endpoint == CLEAN:
        return row["clean/rsum"]
    if endpoint == CORRUPTED:
        return row["agg/mean_corrupted_rsum"]
    return _family_rsum(row, endpoint)


def check_against_rows(effects: stats.Effects, rows: list[dict]) -> None:
    """Every level is the mean over seeds of the logged RSUM, every change the mean over seeds
    of (arm - baseline), to float32 rounding."""
    base = {r["seed"]: r for r in rows if r["arm"] == "baseline"}
    for a, arm in enumerate(effects.arms):
        mine = [r for r in rows if r["arm"] == arm]
        for e, endpoint in enumerate(effects.endpoints):
            level = np.mean([_logged(r, endpoint) for r in mine])
            assert effects.level[a, e] == pytest.approx(level, abs=1e-3), (arm, endpoint)
            if arm != "baseline":
                diff = [_logged(r, endpoint) - _logged(base[r["seed"]], endpoint) for r in mine]
                assert effects.change[a, e] == pytest.approx(np.mean(diff), abs=1e-3)


def test_rsum_from_ranks_is_the_logged_rsum(sweep):
    rows, ranks = sweep
    for row in rows:
        r = ranks[row["trial_id"]]
        assert rsum_from_ranks(r["clean/i2t"], r["clean/t2i"]) == pytest.approx(
            row["clean/rsum"], abs=1e-4
        )
        for c, s in CELLS:
            prefix = f"corrupt/{c}/s{s}"
            got = rsum_from_ranks(r[f"{prefix}/i2t"], r[f"{prefix}/t2i"])
            assert got == pytest.approx(row[f"{prefix}/rsum"], abs=1e-4)


def _sweep_directory(rows: list[dict], ranks: dict, directory) -> tuple[Plan, str]:
    """A sweep directory as a finished sweep leaves it: results.csv and ranks/<trial id>.npz."""
    from clipray.sweep.report import RANKS_DIR, REPORT

    (directory / RANKS_DIR).mkdir(parents=True)
    csv_text = trials_csv(rows, list(rows[0]))
    (directory / REPORT).write_text(csv_text)
    for trial_id, r in ranks.items():
        (directory / RANKS_DIR / f"{trial_id}.npz").write_bytes(npz_bytes(r))
    nowhere = Tracking("sqlite:////nonexistent/m.db", "0", "none")  # no MLflow: runs=None
    plan = Plan("s-1", str(directory), small_experiment("name=s").to_dict(), SPACE, nowhere)
    return plan, csv_text


def test_the_report_from_a_sweep_directory_shows_the_logged_numbers(sweep, tmp_path):
    from clipray.sweep.report import write_study_report

    rows, ranks = sweep
    directory = tmp_path / "s"
    plan, csv_text = _sweep_directory(rows, ranks, directory)
    where, built = write_study_report(plan, csv_text)
    assert where == str(directory / "report") and built.notes == []
    check_against_rows(built.effects, read_results_csv(csv_text))
    files = {p.name for p in (directory / "report").iterdir()}
    assert {"report.md", "report.html", "rsum_vs_epsilon.png", "change_heatmap.png"} <= files
    assert {"pareto.png", "importances.png", "calibration.png"} <= files
    html = (directory / "report" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5 and 'src="http' not in html
    md = (directory / "report" / "report.md").read_text()
    worse = built.effects.arms.index(arm_label(ARMS["worse"][0]))
    assert f"{built.effects.level[worse, 0]:.1f} [" in md  # the table shows the level
    assert "distinguishable" in md and "(held out)" in md


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cells of the first table after ``heading`` in a Markdown report."""
    text = markdown[markdown.index(heading) :]
    lines = text[text.index("\n|") :].strip().split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_results_csv_has_the_losses_and_the_calibration_table_shows_its_numbers(sweep, tmp_path):
    """Per perturbed arm: clean RSUM change = mean over seeds of (arm - baseline) clean/rsum,
    in % of the baseline's mean, and loss gap = mean of train/adv_loss - train/clean_loss, all
    from results.csv; the Markdown table shows them rounded."""
    from clipray.sweep.report import result_columns, write_study_report

    assert {CLEAN_LOSS, ADV_LOSS} <= set(result_columns(small_experiment("name=s")))
    rows, ranks = sweep
    plan, csv_text = _sweep_directory(rows, ranks, tmp_path / "s")
    _, built = write_study_report(plan, csv_text)
    saved = read_results_csv(csv_text)
    base = {r["seed"]: r for r in saved if r["arm"] == "baseline"}
    reference = np.mean([r["clean/rsum"] for r in base.values()])
    table = _table_rows(built.markdown, "## Calibration")
    calibration = calibration_rows(built.effects, built.trials, {"perturb.tower": "image"})
    assert len(table) == len(calibration) == len(ARMS) - 1
    for row, cells in zip(calibration, table, strict=True):
        mine = [r for r in saved if r["perturb.epsilon"] == row.epsilon]
        change = np.mean([r["clean/rsum"] - base[r["seed"]]["clean/rsum"] for r in mine])
        gap = np.mean([r[ADV_LOSS] - r[CLEAN_LOSS] for r in mine])
        assert row.change == pytest.approx(change, abs=1e-3)
        assert row.change_pct == pytest.approx(100 * change / reference, abs=1e-3)
        assert row.gap == pytest.approx(gap, abs=1e-9)
        assert (row.kind, row.layer) == (mine[0]["perturb.kind"], str(mine[0]["perturb.layer"]))
        assert cells[:4] == ["image", row.layer, row.kind, f"{row.epsilon:.3g}"]
        assert cells[4].startswith(f"{change:+.1f} [") and cells[5] == f"{row.change_pct:+.1f}"
        assert cells[6] == f"{gap:+#.3g}"


def _line(kind: str, layer: int, points: dict[float, float]) -> list[CalibrationRow]:
    """A line of arms with the given clean cost (%) at each epsilon (baseline RSUM 100)."""
    nan = float("nan")
    return [
        CalibrationRow("image", str(layer), kind, "", eps, -cost, nan, nan, -cost, 0.1)
        for eps, cost in points.items()
    ]


def test_the_range_of_epsilon_costing_0_to_15_percent_is_interpolated_on_log_epsilon():
    assert cost_range([1e-3, 1e-2, 1e-1], [2, 10, 30]) == CostRange(1e-3, pytest.approx(10**-1.75))
    # a score above the baseline is no measurable cost: the range still starts at the smallest
    crossing = cost_range([1e-3, 1e-2, 1e-1], [-5, 5, 30])  # 15 % at 10^-1.6
    assert crossing.low == 1e-3 and crossing.high == pytest.approx(10**-1.6)
    assert cost_range([1e-3, 1e-2], [1, 8]) == CostRange(1e-3, None)
    assert cost_range([1e-3, 1e-2], [-3, -1]) == CostRange(1e-3, None)
    assert cost_range([1e-2, 1e-1], [20, 40]) == CostRange(None, 1e-2)
    lines = [
        *_line("pgd", 2, {1e-3: 2, 1e-2: 10, 1e-1: 30}),
        *_line("noise", 2, {1e-3: -1, 1e-2: 1, 1e-1: 8}),
        *_line("pgd", 0, {1e-2: 20, 1e-1: 40}),
        *_line("pgd", 1, {1e-3: -2, 1e-2: 20, 1e-1: -4}),  # past the crossing: not in the range
        *_line("pgd", 3, {1e-2: -1}),
    ]
    assert range_sentences(lines) == [
        "Tower image, layer 2: pgd: 0-15 % for epsilon 0.001 (the smallest measured) to 0.0178; "
        "noise: 0-15 % from epsilon 0.001 (the smallest measured) to at least 0.1 (the largest "
        "measured, 8.0 %) (above the baseline, no measurable cost, at 0.001); 15 % not reached.",
        "Tower image, layer 0: pgd: above 15 % already at the smallest measured epsilon 0.01 "
        "(20.0 %); the range lies below it.",
        "Tower image, layer 1: pgd: 0-15 % for epsilon 0.001 (the smallest measured) to 0.00593 "
        "(above the baseline, no measurable cost, at 0.001).",
        "Tower image, layer 3: pgd: 0-15 % at epsilon 0.01, the only one measured (above the "
        "baseline, no measurable cost, at 0.01).",
    ]


def test_the_epsilon_axis_is_labelled_even_when_its_range_spans_less_than_a_decade():
    # a study's grid: its own values (the default log ticks label powers of ten only, so 0.002
    # and 0.008 showed no label at all)
    assert epsilon_ticks([0.008, 0.002, 0.002, 0.0]) == [0.002, 0.008]
    sampled = list(np.geomspace(1e-3, 8e-3, 40))  # a searched range: log-spaced labels
    ticks = epsilon_ticks(sampled)
    assert len(ticks) == 6 and ticks[0] == 0.001 and ticks[-1] == 0.008
    assert ticks == sorted(ticks) and all(1e-3 <= t <= 8e-3 for t in ticks)
    assert epsilon_ticks([]) == []
    # sampled values close together (0.00248, 0.003): their labels would collide, so the axis
    # takes log-spaced 2-digit points instead
    close = epsilon_ticks([0.00104294, 0.00248417, 0.00300358, 0.00442466])
    assert close == [0.001, 0.0014, 0.0019, 0.0025, 0.0033, 0.0044]


@pytest.mark.parametrize("older", ["no columns", "empty columns"])
def test_a_sweep_without_the_loss_columns_shows_the_clean_cost_and_says_why_no_gap(older):
    rows, ranks = sweep_rows(with_losses=older != "no columns")
    if older == "empty columns":
        rows = [{**r, CLEAN_LOSS: float("nan"), ADV_LOSS: float("nan")} for r in rows]
    built = build_report(_inputs(rows, ranks), resamples=RESAMPLES)
    assert built.notes == [NO_LOSSES] and NO_LOSSES in built.markdown
    table = _table_rows(built.markdown, "## Calibration")
    assert len(table) == len(ARMS) - 1 and {cells[-1] for cells in table} == {"-"}
    assert all(cells[4] != "-" for cells in table) and "calibration.png" in built.images


def test_bootstrap_intervals_cover_a_known_mean_at_their_nominal_rate():
    """500 simulated evaluations of a baseline and an arm on the same queries, each query's
    (baseline, arm) score drawn from a known joint distribution: the 95 % interval of the RSUM
    change covers the true change in 95 % of them, within 3 binomial standard errors."""
    rng = np.random.default_rng(7)
    scores = np.array([(b, a) for b in range(4) for a in range(4)], np.float32)
    joint = rng.dirichlet(np.ones(16))  # P(baseline score = b, arm score = a) per query
    truth = 2 * 100 * float(joint @ (scores[:, 1] - scores[:, 0]))  # both directions alike
    n, datasets, covered = 150, 500, 0
    for k in range(datasets):
        pairs = {d: scores[rng.choice(16, size=n, p=joint)] for d in ("i2t", "t2i")}
        arrays = {d: pairs[d].T[:, None, None, :] for d in pairs}  # (arm, seed, endpoint, q)
        design = Design(
            ("b", "a"), (0,), ("clean",), arrays["i2t"], arrays["t2i"], np.ones((2, 1), bool)
        )
        effects = bootstrap(design, has_baseline=True, resamples=RESAMPLES, seed=k)
        covered += effects.low[1, 0] <= truth <= effects.high[1, 0]
    tolerance = 3 * math.sqrt(0.95 * 0.05 / datasets)
    assert abs(covered / datasets - 0.95) <= tolerance, covered / datasets


def test_with_three_seeds_no_effect_is_called_real_more_often_than_alpha():
    """Arm and baseline are models of one kind (each seed its own draw of a model's per-query
    hit rates): with 3 paired seeds the report must call the difference real in at most ~5 % of
    studies. A percentile bootstrap over the 3 seeds did so in ~20 % (all 3 differences share a
    sign a quarter of the time)."""
    rng = np.random.default_rng(11)
    n, datasets, seeds, positives = 120, 400, 3, 0
    for k in range(datasets):
        skill = rng.normal(0.0, 0.4, size=(2, seeds))  # training randomness, per arm and seed
        logits = rng.normal(0.0, 1.0, size=n) + skill[..., None]  # (arm, seed, query)
        hits = (rng.random((3, 2, seeds, n)) < 1 / (1 + np.exp(-logits))).sum(0)
        scores = hits[:, :, None, :].astype(np.float32)  # (arm, seed, endpoint, query)
        design = Design(("b", "a"), tuple(range(seeds)), ("clean",), scores, scores,
                        np.ones((2, seeds), bool))  # fmt: skip
        effects = bootstrap(design, has_baseline=True, resamples=200, seed=k)
        positives += bool(effects.p[1, 0] < 0.05)
    assert positives / datasets <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / datasets), positives


def test_holm_against_a_hand_worked_example():
    # sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> max(0.06, 0.04)
    got = holm([0.01, 0.04, 0.03, 0.005])
    assert got == pytest.approx([0.03, 0.06, 0.06, 0.02])
    with_gap = holm([0.01, float("nan"), 0.5])  # NaN: not a test (m = 2)
    assert with_gap[0] == pytest.approx(0.02) and math.isnan(with_gap[1])
    assert with_gap[2] == pytest.approx(0.5)
    assert holm([0.3, 0.4]) == pytest.approx([0.6, 0.6])  # monotone, capped at 1 below
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_the_report_applies_holm_across_arms_and_labels_each_effect():
    rows, ranks = sweep_rows(seeds=tuple(range(5)))  # t(0.975, n - 1): 12.7 for 2 seeds, 2.8 for 5
    effects = build_report(_inputs(rows, ranks), resamples=RESAMPLES).effects
    for e in range(len(effects.endpoints)):
        assert np.allclose(effects.p_holm[1:, e], holm(effects.p[1:, e]))
    assert np.array_equal(effects.distinguishable, np.nan_to_num(effects.p_holm, nan=1) < 0.05)
    worse = effects.arms.index(arm_label(ARMS["worse"][0]))
    same = effects.arms.index(arm_label(ARMS["weak"][0]))  # trained like the baseline
    clean = effects.endpoints.index(CLEAN)
    assert effects.distinguishable[worse, clean] and effects.high[worse, clean] < 0
    assert not effects.distinguishable[same].any() and effects.change[same] == pytest.approx(0)


def test_a_sweep_with_no_finished_trial_says_so_and_still_lists_its_trials(sweep):
    rows, ranks = sweep
    running = [{**r, "status": "RUNNING", "clean/rsum": float("nan")} for r in rows[:3]]
    built = build_report(_inputs(running, {}))
    assert built.notes == [NO_TRIAL] and built.effects is None and built.images == {}
    assert NO_TRIAL in built.markdown and "## Every trial" in built.markdown
    assert built.markdown.count("| RUNNING |") == 3 and NO_TRIAL in built.html


def test_a_sweep_without_a_baseline_shows_levels_and_no_changes(sweep):
    rows, ranks = sweep
    rest = [r for r in rows if r["arm"] != "baseline"]
    built = build_report(_inputs(rest, ranks), resamples=RESAMPLES)
    assert built.notes == [NO_BASELINE]
    effects = built.effects
    assert "baseline" not in effects.arms and np.isnan(effects.change).all()
    assert np.isfinite(effects.level_low).all() and not effects.distinguishable.any()
    assert {"rsum_vs_epsilon.png", "pareto.png"} <= set(built.images)
    assert "change_heatmap.png" not in built.images  # nothing to show a change against
    assert NO_BASELINE in built.markdown


def test_one_seed_or_no_ranks_are_said_and_the_rest_is_shown(sweep):
    rows, ranks = sweep
    seed0 = [r for r in rows if r["seed"] == 0]
    one = build_report(_inputs(seed0, ranks), resamples=RESAMPLES)
    assert one.notes == [ONE_SEED] and np.isfinite(one.effects.low[1:]).all()
    check_against_rows(one.effects, seed0)
    no_ranks = build_report(_inputs(rows, {}), resamples=RESAMPLES)
    assert no_ranks.notes == [NO_RANKS]  # seeds resampled, numbers from the logged metrics
    check_against_rows(no_ranks.effects, rows)
    neither = build_report(_inputs(seed0, {}), resamples=RESAMPLES)
    assert neither.notes == [NO_INTERVALS]
    partial = {k: v for k, v in ranks.items() if k != rows[-1]["trial_id"]}
    some = build_report(_inputs(rows, partial), resamples=RESAMPLES)
    assert len(some.notes) == 1 and rows[-1]["trial_id"] in some.notes[0]


def test_ranks_that_disagree_with_the_metrics_are_named(sweep):
    rows, ranks = sweep
    swapped = {**ranks, rows[0]["trial_id"]: ranks[rows[-1]["trial_id"]]}
    built = build_report(_inputs(rows, swapped), resamples=RESAMPLES)
    assert any(rows[0]["trial_id"] in n and "its metrics" in n for n in built.notes)


def test_arm_labels_and_the_pareto_front():
    assert arm_label({"perturb.epsilon": 0.0, "perturb.layer": 2}) == "baseline"
    assert arm_label({"perturb.epsilon": "0", "seed": 3}) == "baseline"
    params = {"perturb.tower": "image", "perturb.epsilon": 0.0031622, "seed": 1}
    assert arm_label(params, digits=3) == "epsilon=0.00316, tower=image"  # run names
    assert arm_label(params) == "epsilon=0.0031622, tower=image"  # the identity: never merged
    assert arm_label({"clipray.baseline": True, "perturb.epsilon": 0.01}) == "baseline"
    assert pareto_front([1, 2, 3, 2], [3, 2, 1, 1]) == [0, 1, 2]
    assert pareto_front([1, 1, float("nan")], [1, 0, 5]) == [0]


def test_pgd_arms_meet_their_noise_twins_and_the_baseline_is_none():
    from clipray.analysis.contrast import twins
    from clipray.analysis.results import Trial

    def trial(**params) -> Trial:
        params = {"perturb.layer": 1, "perturb.epsilon": 0.008, "perturb.kind": "pgd", **params}
        return Trial("t", arm_label(params), 0, params, {}, None)

    base = {"perturb.epsilon": 0.0}  # unsearched kind reads pgd; its noise twin is planted
    trials = [trial(**base), trial(**base, **{"perturb.kind": "noise"}), trial(),
              trial(**{"perturb.kind": "noise"}), trial(**{"perturb.layer": 2})]  # fmt: skip
    assert twins(trials) == [(trials[2].arm, trials[3].arm)]


def test_a_report_that_fails_at_the_end_of_a_sweep_is_one_line_not_a_failure(sweep, tmp_path):
    from clipray.sweep.report import report_at_end

    rows, _ = sweep
    (tmp_path / "blocker").write_text("a file where the sweep directory should be")
    tracking = Tracking("http://127.0.0.1:9", "0", "none")  # never reached: writing fails first
    plan = Plan("s-1", str(tmp_path / "blocker" / "s"), {}, SPACE, tracking)
    lines: list[str] = []
    report_at_end(plan, trials_csv(rows, list(rows[0])), lines.append)
    assert len(lines) == 1 and lines[0].startswith("report not written: "), lines


def _mlflow_rows(uri: str) -> list[dict]:
    """Each trial as MLflow holds it: its arm and seed from its params, its metrics."""
    from mlflow.tracking import MlflowClient

    from tests.e2e import child_runs

    out = []
    for run in child_runs(MlflowClient(uri)):
        params = {k: float(run.data.params[k]) for k in ("perturb.epsilon", "perturb.layer")}
        params["perturb.kind"] = run.data.params["perturb.kind"]
        seed = int(run.data.params["seed"])
        out.append({"arm": arm_label(params), "seed": seed, **run.data.metrics})
    return out


@pytest.mark.slow
def test_the_report_from_mlflow_shows_mlflow_numbers_and_lands_on_the_parent_run(
    sweep, tmp_path, mlflow_server, monkeypatch, capsys
):
    """Trials logged with the project's Runs API on a real server; ``clipray report`` from the
    tracking URI alone and from the sweep directory (ranks from MLflow: no ranks/ there)."""
    from mlflow.tracking import MlflowClient

    from clipray.cli.main import main
    from clipray.config.space import parse_space
    from clipray.sweep.manifest import start_plan
    from clipray.sweep.report import RANKS_ARTIFACT, plan_from_mlflow, report, study_inputs
    from clipray.sweep.tracking import flatten

    rows, ranks = sweep
    monkeypatch.chdir(tmp_path)
    runs_dir = tmp_path / "runs"
    exp = small_experiment("name=s", f"storage={runs_dir}", f"tracking.uri={mlflow_server}")
    plan = start_plan(exp, parse_space(SPACE, "test space"))
    runs = plan.tracking.runs()
    for row in rows:
        run_id = runs.trial(row["trial_id"], row["trial"])
        values = {**flatten(exp.to_dict()), **{k: row[k] for k in SPACE}, "seed": row["seed"]}
        runs.log_params(run_id, values)
        runs.log_metrics(run_id, {k: v for k, v in row.items() if "/" in k}, 10)
        runs.log_artifacts(run_id, {RANKS_ARTIFACT: npz_bytes(ranks[row["trial_id"]])})
        runs.finish(run_id)

    found, older = plan_from_mlflow(mlflow_server, "s")
    assert found.tracking == plan.tracking and found.space == SPACE and older == []
    _, csv_text = report(found)
    built = build_report(study_inputs(found, csv_text, found.tracking.runs(), False), RESAMPLES)
    assert built.notes == []
    check_against_rows(built.effects, _mlflow_rows(mlflow_server))

    out = tmp_path / "out"
    assert main(["report", "--tracking-uri", mlflow_server, "--sweep", "s", "--out", str(out)]) == 0
    assert {"results.csv", "report.md", "report.html", "pareto.png"} <= {
        p.name for p in out.iterdir()
    }
    saved = read_results_csv((out / "results.csv").read_text())
    assert sorted((r["arm"], r["seed"]) for r in saved) == sorted(
        (r["arm"], r["seed"]) for r in rows
    )
    client = MlflowClient(mlflow_server)
    logged = {a.path for a in client.list_artifacts(plan.tracking.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/pareto.png"} <= logged

    assert main(["report", str(runs_dir / "s")]) == 0
    printed = capsys.readouterr().out
    assert f"report: {runs_dir / 's' / 'report' / 'report.html'}" in printed
    assert "note:" not in printed  # every trial's ranks were found on its MLflow run
    assert main(["report", "--sweep", "s"]) == 2  # the URI is missing: one line
    assert main(["report", "--tracking-uri", mlflow_server, "--sweep", "nosuch"]) == 2
    assert "no sweep 'nosuch'" in capsys.readouterr().err


def test_pgd_is_compared_with_its_own_noise_control():
    """The study's question as its own test: PGD minus the noise arm of the same tower, layer and
    epsilon, paired by seed and query; an arm without its control is not in the table."""
    arms = {
        "baseline": ARMS["baseline"],  # its searched values say pgd: it is no PGD arm all the same
        "pgd": ({"perturb.layer": 1, "perturb.epsilon": 0.01, "perturb.kind": "pgd"}, 1.6, 0.5),
        "noise": ({"perturb.layer": 1, "perturb.epsilon": 0.01, "perturb.kind": "noise"}, 1.6, 0),
        "lone": ({"perturb.layer": 2, "perturb.epsilon": 0.01, "perturb.kind": "pgd"}, 1.6, 0.0),
    }
    rows, ranks = sweep_rows(arms, seeds=tuple(range(4)))
    built = build_report(_inputs(rows, ranks), resamples=RESAMPLES)
    table = _table_rows(built.markdown, "## PGD against its noise control")
    assert [cells[0] for cells in table] == [arm_label(arms["pgd"][0])]
    trials = {(r["arm"], r["seed"]): r for r in rows}
    pgd, noise = arm_label(arms["pgd"][0]), arm_label(arms["noise"][0])
    clean = np.mean(
        [trials[pgd, s]["clean/rsum"] - trials[noise, s]["clean/rsum"] for s in range(4)]
    )
    assert table[0][1].startswith(f"{clean:+.1f}")


def test_importances_find_a_planted_effect_on_a_small_grid_of_arms():
    """8 arms of a 2 x 2 x 2 grid (the study's shape): the tower moves the value by 10, the rest
    by noise below 1. Optuna's default evaluator (PED-ANOVA) says 1/3 each for any values here;
    the report's must put the tower first, and give the same answer each time."""
    space = {
        "perturb.kind": {"type": "grid", "values": ["pgd", "noise"]},
        "perturb.layer": {"type": "grid", "values": [1, 3]},
        "perturb.tower": {"type": "grid", "values": ["image", "text"]},
    }
    rng = np.random.default_rng(0)
    arms, values = {}, {}
    for i, combo in enumerate(itertools.product(*(v["values"] for v in space.values()))):
        arms[str(i)] = dict(zip(space, combo, strict=True))
        values[str(i)] = 10.0 * (combo[2] == "text") + rng.uniform(0, 1)
    found, why = param_importances(arms, values, space, "max")
    assert why is None and max(found, key=found.get) == "perturb.tower"
    assert found["perturb.tower"] > 0.8 and math.isclose(sum(found.values()), 1.0)
    assert param_importances(arms, values, space, "max") == (found, None)  # seeded: reproducible
