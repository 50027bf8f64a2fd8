"""A trial's Ray Train run after its storage failed: Ray's damaged record of the run's
checkpoints is dropped and training continues from the newest checkpoint that loads."""

from __future__ import annotations

import json

from clipray.core.checkpoint import FORMAT, save_checkpoint
from clipray.sweep.ray_train import CHECKPOINT_FILE, SNAPSHOT, recover_run


def _run(tmp_path, record: str | None):
    run = tmp_path / "train" / "t1"
    for step, name in ((8, "checkpoint_a"), (16, "checkpoint_b"), (24, "checkpoint_c")):
        save_checkpoint(run / name / CHECKPOINT_FILE, {**_blob(), "step": step})
    data = (run / "checkpoint_c" / CHECKPOINT_FILE).read_bytes()
    (run / "checkpoint_c" / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])  # cut short
    if record is not None:
        (run / SNAPSHOT).write_text(record)
    return run


def _blob() -> dict:
    return {"format": FORMAT, "model": {}, "config": {}, "optimizer": {}, "scheduler": {}}


def test_a_truncated_record_is_dropped_and_the_newest_loadable_checkpoint_chosen(tmp_path):
    run = _run(tmp_path, "")  # what a full disk left: an empty file
    assert recover_run(str(tmp_path / "train"), "t1") == str(run / "checkpoint_b")
    assert not (run / SNAPSHOT).exists()


def test_a_sound_record_or_none_is_left_to_ray(tmp_path):
    run = _run(tmp_path, json.dumps({"checkpoints": []}))
    assert recover_run(str(tmp_path / "train"), "t1") is None
    assert (run / SNAPSHOT).exists()
    assert recover_run(str(tmp_path / "train"), "no-such-run") is None


def test_tunes_state_cut_short_is_replaced_by_its_last_whole_copy(tmp_path):
    import pickle

    from clipray.sweep.callbacks import BACKUP, backup_tune_state, repair_tune_state

    sweep = tmp_path / "s"
    sweep.mkdir()
    state = {
        "experiment_state-1.json": b'{"trials": [1, 2]}',
        "searcher-state-1.pkl": pickle.dumps({"n": 2}),
    }
    for name, data in state.items():
        (sweep / name).write_bytes(data)
    assert not repair_tune_state(str(sweep))  # whole: left alone
    backup_tune_state(str(sweep))
    (sweep / "experiment_state-1.json").write_bytes(b'{"trials": [1, 2, 3')  # the disk filled up
    backup_tune_state(str(sweep))  # a damaged state never replaces the copy
    assert repair_tune_state(str(sweep))
    assert {n: (sweep / n).read_bytes() for n in state} == state
    assert sorted(p.name for p in (sweep / BACKUP).iterdir()) == sorted(state)


def test_runs_of_trials_tune_does_not_know_are_retired_and_not_listed(tmp_path):
    from clipray.sweep.tracking import open_sweep
    from tests.conftest import small_experiment

    exp = small_experiment(f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "name=s")
    runs = open_sweep(exp, "s-1").runs()
    known, lost, failed = (runs.trial(t, t) for t in ("known", "lost", "failed"))
    runs.finish(failed, "FAILED")
    assert sorted(runs.retire_orphans({"known"})) == sorted([lost, failed])
    assert [r["trial_id"] for r in runs.trial_rows([], [])] == ["known"]
    assert runs.find_trial("lost") is None and runs.find_trial("known") == known
