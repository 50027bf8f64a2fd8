"""``clipray data --preview``: one eval image under every corruption, as the scorer sees it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import clipray.scoring.preview as P
from clipray.cli.main import DEFAULT_SWEEP, main
from clipray.config.corruption_names import GROUPS
from clipray.config.loading import load_experiment
from clipray.core.data import load_split
from clipray.scoring.corruptions import corrupt_batch

INDEX = 2  # not 0: the cells must be seeded as image INDEX of the eval set


def test_families_keep_every_corruption_in_imagenet_c_order():
    groups = P.families(["all"])
    assert [f for f, _ in groups] == ["noise", "blur", "weather", "digital", "extra"]
    assert [n for _, members in groups for n in members] == list(GROUPS["all"])


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    """The preview of the default sweep's test image INDEX (one run, ~6 s on one core)."""
    out = tmp_path_factory.mktemp("preview") / "docs" / "corruptions.png"
    assert main(["data", "--preview", str(out), "--index", str(INDEX)]) == 0
    return out


def test_preview_is_the_expected_grid_with_the_scorers_cells(preview):
    exp = load_experiment(str(DEFAULT_SWEEP), [])
    split = load_split(exp.data, exp.eval.split)
    caption = f"{exp.eval.split} image {INDEX}: {split.captions[INDEX][0]}"
    names = list(GROUPS["all"])
    geo = P.layout(64, 1 + len(P.SEVERITIES), caption, names)
    picture = Image.open(preview)
    assert picture.format == "PNG" and picture.mode == "RGB"
    assert picture.size == (geo.width, geo.height(5, len(names)))
    assert geo.scale == 2 and preview.stat().st_size < 500_000  # grain does not compress
    # the weather family's first row, severity 3: the cache's cell for image INDEX, shown x2
    images = split.load_all(64)[: INDEX + 1]
    cell = corrupt_batch(images, "snow", 3, exp.eval.seed)[INDEX]
    want = np.clip((cell.astype(int) + P.STEP // 2) // P.STEP * P.STEP, 0, 255)
    want = want.repeat(2, axis=0).repeat(2, axis=1)
    x, y = geo.x(2), geo.y(2, names.index("snow"))
    got = np.asarray(picture)[y : y + geo.cell, x : x + geo.cell]
    assert np.array_equal(got, want)


def _fails(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipray: error: "), err
    assert all(w in err for w in words), err
    return err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--index", "256"], ["--index", "0..255", "256"]),
        (["--index", "-1"], ["--index", "0..255"]),
        (["--index", "4", "--set", "eval.max_images=4"], ["--index", "0..3", "4 images"]),
    ],
)
def test_a_bad_index_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra, words):
    out = tmp_path / "sub" / "p.png"
    _fails(["data", "--preview", str(out), *extra], capsys, *words)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_target_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "blocker").write_text("")
    _fails(["data", "--preview", str(tmp_path / "p.jpg")], capsys, "--preview", ".png")
    _fails(["data", "--preview", str(tmp_path)], capsys, "--preview", "directory")
    _fails(["data", "--preview", str(tmp_path / "blocker" / "p.png")], capsys, "not a directory")
    _fails(["data", "--index", "1", "--out", str(tmp_path / "d")], capsys, "--index", "--preview")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_a_failing_corruption_leaves_no_half_written_file(tmp_path, capsys, monkeypatch):
    calls = []

    def corrupt(*args):
        calls.append(args)
        if len(calls) > 3:
            raise ValueError("boom")
        return args[0]

    monkeypatch.setattr(P, "corrupt", corrupt)
    _fails(["data", "--preview", str(tmp_path / "p.png")], capsys, "boom")
    assert list(tmp_path.iterdir()) == []


def test_out_and_preview_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "--out", str(tmp_path / "d"), "--preview", str(tmp_path / "p.png")])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
