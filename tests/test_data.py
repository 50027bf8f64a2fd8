"""Datasets: synthetic captioned shapes (deterministic, truthful captions), CSV/TSV and Karpathy
JSON on real image files, resize + centre crop, and clear errors for missing or broken images."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipray.config.errors import ConfigError
from clipray.config.loading import load_experiment
from clipray.config.schema import CsvData, KarpathyData, SyntheticData
from clipray.core.data import CaptionedImages, load_split
from clipray.core.synthetic import (
    BACKGROUNDS,
    COLOURS,
    LAYOUT_BACKGROUNDS,
    MIN_CONTRAST,
    NUMBERS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    _luma,
    _palette,
    _shade,
    synthetic_image,
)

# Data-layer tests use their own sizes, not conftest's TINY: a training split of another size than
# val and test, so a mixed-up split shows in its length.
SMALL = SyntheticData(
    train_size=48, val_size=24, test_size=24, captions="colour", min_shapes=1, max_shapes=2
)  # colour captions state every fact of the pixels, so these tests can check them all
COLOUR = SyntheticData(captions="colour", min_shapes=1)
SHAPE_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(POSITIONS)})"
)
NOISE = 6  # the synthetic images' texture: +-6 per channel around the palette colour


def _colour_mask(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.abs(img.astype(int) - np.array(rgb)).max(axis=-1) <= NOISE


def _facts(caption: str) -> tuple[set[tuple[str, ...]], str]:
    """The shapes and the background a caption states."""
    shapes = set(SHAPE_RE.findall(caption))
    bg = [b for b in BACKGROUNDS if re.search(rf"\b{b}\b", caption)]
    assert len(bg) == 1, caption
    return shapes, bg[0]


# --------------------------------------------------------------------------- synthetic: seeds
def test_same_seed_gives_identical_images_and_captions():
    a, b = load_split(SMALL, "train"), load_split(SMALL, "train")
    assert np.array_equal(a.images, b.images)
    assert a.captions == b.captions


def test_different_seed_gives_different_data():
    a = load_split(SMALL, "train")
    b = load_split(SMALL.model_copy(update={"data_seed": SMALL.data_seed + 1}), "train")
    assert a.captions != b.captions
    assert (a.images != b.images).any(axis=(1, 2, 3)).all()  # every image differs


def test_splits_differ_from_each_other():
    splits = {s: load_split(SMALL, s) for s in SPLITS}
    for s, t in [("train", "val"), ("train", "test"), ("val", "test")]:
        n = min(len(splits[s]), len(splits[t]))
        assert (splits[s].images[:n] != splits[t].images[:n]).any(axis=(1, 2, 3)).all()
        assert not set(map(tuple, splits[s].captions)) & set(map(tuple, splits[t].captions))


def test_image_i_depends_only_on_seed_split_and_index():
    """Changing the split's size does not change the images it shares with a smaller one."""
    big = load_split(SMALL.model_copy(update={"val_size": 40}), "val")
    small = load_split(SMALL, "val")
    assert np.array_equal(big.images[: len(small)], small.images)
    img, caps = synthetic_image(SMALL, "val", 7)
    assert np.array_equal(img, small.images[7]) and caps == small.captions[7]


@pytest.mark.parametrize("split", SPLITS)
def test_split_sizes_and_array_layout(split):
    data = load_split(SMALL, split)
    assert len(data) == {"train": 48, "val": 24, "test": 24}[split]
    assert data.images.shape == (len(data), 64, 64, 3) and data.images.dtype == np.uint8
    assert data.name == f"synthetic/{split}"


@pytest.mark.parametrize("size", [16, 33, 96])
def test_image_size_is_configurable(size):
    data = load_split(SMALL.model_copy(update={"image_size": size, "val_size": 3}), "val")
    assert data.images.shape == (3, size, size, 3)


def test_images_are_not_trivial():
    data = load_split(SMALL, "val")
    assert len({bytes(im) for im in data.images}) == len(data)
    per_image_colours = [len(np.unique(im.reshape(-1, 3) // 32, axis=0)) for im in data.images]
    assert min(per_image_colours) >= 2  # a background and at least one shape


# ------------------------------------------------------------------------ synthetic: captions
@pytest.mark.parametrize("k", [1, 3, 5])
def test_several_distinct_captions_per_image_all_stating_the_same_facts(k):
    cfg = SMALL.model_copy(update={"captions_per_image": k, "max_shapes": 3})
    data = load_split(cfg, "val")
    for caps in data.captions:
        assert len(caps) == k and len(set(caps)) == k
        facts = [_facts(c) for c in caps]
        assert all(f == facts[0] for f in facts), caps
        assert 1 <= len(facts[0][0]) <= 3


@pytest.mark.parametrize("max_shapes", [1, 2, 4])
def test_number_of_shapes_stays_within_max_shapes_and_varies(max_shapes):
    cfg = SMALL.model_copy(update={"max_shapes": max_shapes, "train_size": 200})
    counts = Counter(len(_facts(c[0])[0]) for c in load_split(cfg, "train").captions)
    assert set(counts) == set(range(1, max_shapes + 1))


def _template_mask(kind: str, size: str, side: int) -> np.ndarray:
    """The shape drawn alone, cropped to its bounding box (the module's own drawing table)."""
    im = Image.new("L", (side, side), 0)
    SHAPES[kind](ImageDraw.Draw(im), side / 2, side / 2, SIZES[size] * side, 255)
    return _crop(np.asarray(im) > 0)


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    h, w = max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1])
    pa, pb = np.zeros((h, w), bool), np.zeros((h, w), bool)
    pa[: a.shape[0], : a.shape[1]], pb[: b.shape[0], : b.shape[1]] = a, b
    return float((pa & pb).sum() / (pa | pb).sum())


def test_one_shape_captions_match_the_pixels():
    """For 1-shape images: every pixel is the stated background or the stated colour, the shape
    sits in the stated grid cell, and its outline matches the stated kind and size best."""
    side = 96
    cfg = COLOUR.model_copy(
        update={"image_size": side, "max_shapes": 1, "captions_per_image": 1, "val_size": 120}
    )
    templates = {(k, s): _template_mask(k, s, side) for k in SHAPES for s in SIZES}
    data = load_split(cfg, "val")
    whole_shapes = 0
    for img, (caption,) in zip(data.images, data.captions, strict=True):
        ((size, colour, kind, position),), background = _facts(caption)
        shape = _colour_mask(img, COLOURS[colour])
        assert (shape | _colour_mask(img, BACKGROUNDS[background])).all(), caption
        assert shape.sum() >= 0.75 * templates[(kind, size)].sum(), caption
        ys, xs = np.nonzero(shape)
        row, col = divmod(POSITIONS.index(position), 3)
        assert row <= ys.mean() * 3 / side < row + 1, caption
        assert col <= xs.mean() * 3 / side < col + 1, caption
        if ys.min() == 0 or xs.min() == 0 or max(ys.max(), xs.max()) == side - 1:
            continue  # touches the border: clipped, its outline says little
        whole_shapes += 1
        scores = {key: _iou(_crop(shape), t) for key, t in templates.items()}
        assert max(scores, key=scores.get) == (kind, size), (caption, scores)
    assert whole_shapes >= 60


def test_every_stated_shape_is_visible_in_multi_shape_images():
    cfg = COLOUR.model_copy(
        update={"image_size": 96, "max_shapes": 4, "captions_per_image": 1, "val_size": 100}
    )
    areas = {(k, s): _template_mask(k, s, 96).sum() for k in SHAPES for s in SIZES}
    data = load_split(cfg, "val")
    checked = 0
    for img, (caption,) in zip(data.images, data.captions, strict=True):
        shapes, _ = _facts(caption)
        colours = Counter(c for _, c, _, _ in shapes)
        for size, colour, kind, _ in shapes:
            visible = _colour_mask(img, COLOURS[colour]).sum()
            if colours[colour] == 1:  # its pixels are its own
                assert visible >= 0.75 * areas[(kind, size)], caption
                checked += 1
            else:
                assert visible > 0, caption
    assert checked >= 150


def test_few_captions_are_shared_between_images():
    """Retrieval needs captions that pick out their image: measure how many are shared."""

    def shared_fraction(data: CaptionedImages) -> float:
        owners: dict[str, set[int]] = {}
        for i, caps in enumerate(data.captions):
            for c in caps:
                owners.setdefault(c, set()).add(i)
        flat = [c for caps in data.captions for c in caps]
        return sum(len(owners[c]) > 1 for c in flat) / len(flat)

    for cfg in (SyntheticData(), COLOUR.model_copy(update={"max_shapes": 2})):
        for split in ("val", "test"):  # what is scored: 256 images each
            assert shared_fraction(load_split(cfg, split)) <= 0.05, (cfg.captions, split)
        # the 2048-image training split: a contrastive batch of 64 rarely holds a repeated caption
        assert shared_fraction(load_split(cfg, "train")) <= 0.25, cfg.captions


# ------------------------------------------------------------------ synthetic: layout captions
LAYOUT_RE = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITIONS)})")


def test_layout_captions_name_no_colour_and_state_count_kind_size_and_place():
    cfg = SyntheticData(captions_per_image=5, val_size=64)
    data = load_split(cfg, "val")
    counts = Counter()
    for img, caps in zip(data.images, data.captions, strict=True):
        facts = [set(LAYOUT_RE.findall(c)) for c in caps]
        assert all(f == facts[0] for f in facts) and len(set(caps)) == 5, caps
        n = len(facts[0])
        counts[n] += 1
        words = {w.strip(",.:;") for c in caps for w in c.split()}
        assert not words & (set(COLOURS) | set(BACKGROUNDS)), caps
        assert NUMBERS[n] in caps[1] and NUMBERS[n] in caps[4], caps  # the count, said
        for _, _, position in facts[0]:  # something that is not background is there
            row, col = divmod(POSITIONS.index(position), 3)
            cell = img[row * 64 // 3 : (row + 1) * 64 // 3, col * 64 // 3 : (col + 1) * 64 // 3]
            assert np.abs(cell.astype(int) - cell.reshape(-1, 3).mean(0)).max() > 30, caps
    assert set(counts) == {2, 3}  # min_shapes..max_shapes


PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle"}
PLURALS |= {"diamonds": "diamond", "stars": "star", "crosses": "cross"}
COUNT_RE = re.compile(
    rf"\b(a|{'|'.join(NUMBERS[2:])}) ({'|'.join(SIZES)}) ({'|'.join([*SHAPES, *PLURALS])})\b"
)


def _counted(caption: str) -> Counter:
    """(size, kind) -> how many, as a counts caption states it."""
    out = Counter()
    for number, size, kind in COUNT_RE.findall(caption):
        assert (number == "a") == (kind in SHAPES), caption  # "a star", "two stars"
        out[(size, PLURALS.get(kind, kind))] += 1 if number == "a" else NUMBERS.index(number)
    return out


def test_counts_captions_tally_the_layout_captions_shapes_without_places():
    """counts captions describe the very same images as layout captions (same seed), stating how
    many shapes of each size and kind and nothing about places or colours."""
    layout = SyntheticData(captions_per_image=5, val_size=64, max_shapes=4)
    counts = layout.model_copy(update={"captions": "counts"})
    a, b = load_split(layout, "val"), load_split(counts, "val")
    assert np.array_equal(a.images, b.images)
    seen = Counter()
    for by_place, caps in zip(a.captions, b.captions, strict=True):
        placed = Counter((size, kind) for size, kind, _ in LAYOUT_RE.findall(by_place[0]))
        assert all(_counted(c) == placed for c in caps) and len(set(caps)) == 5, caps
        n = sum(placed.values())
        seen[n] += 1
        words = {w.strip(",.:;") for c in caps for w in c.split()}
        assert not words & (set(COLOURS) | set(BACKGROUNDS) | {"top", "left", "center"}), caps
        assert NUMBERS[n] in caps[1] and NUMBERS[n] in caps[4], caps
        seen["plural"] += any(v > 1 for v in placed.values())
    assert set(seen) - {"plural"} == {2, 3, 4} and seen["plural"] >= 5


def test_layout_shapes_contrast_with_their_background():
    """Colours vary but every shape stands out by at least MIN_CONTRAST luma steps, so contrast,
    brightness and fog leave it visible (its caption stays true)."""
    for background in LAYOUT_BACKGROUNDS:
        palette = _palette(SyntheticData(), background)
        assert len(palette) >= 4
        bg = _luma(BACKGROUNDS[background])
        assert all(abs(_luma(COLOURS[c]) - bg) >= MIN_CONTRAST for c in palette)


def test_shape_range_is_checked():
    with pytest.raises(ValueError, match="min_shapes .4. must not exceed max_shapes .2."):
        SyntheticData(min_shapes=4, max_shapes=2)


def test_captions_of_different_images_are_mostly_distinct_sets():
    data = load_split(COLOUR.model_copy(update={"max_shapes": 2}), "val")
    distinct = len({frozenset(_facts(c[0])[0]) | {_facts(c[0])[1]} for c in data.captions})
    assert distinct >= 0.95 * len(data)


# ----------------------------------------------------------------------- CaptionedImages itself
def test_flat_captions_lists_every_caption_with_its_image():
    data = CaptionedImages(np.zeros((3, 8, 8, 3), np.uint8), [["a"], ["b", "c", "d"], ["e"]])
    texts, owner = data.flat_captions()
    assert texts == ["a", "b", "c", "d", "e"]
    assert owner.tolist() == [0, 1, 1, 1, 2]


def test_captioned_images_reject_mismatched_or_empty_captions():
    with pytest.raises(ValueError, match="2 images but 1 caption lists"):
        CaptionedImages(np.zeros((2, 8, 8, 3), np.uint8), [["a"]], "x")
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        CaptionedImages(np.zeros((2, 8, 8, 3), np.uint8), [["a"], []], "x")


def test_subset_and_in_memory_resize():
    data = load_split(SMALL, "val")
    sub = data.subset(5)
    assert len(sub) == 5 and sub.captions == data.captions[:5]
    assert data.subset(None) is data and data.subset(1000) is data
    assert np.array_equal(data.image(0, 64), data.images[0])
    assert data.load_all(32).shape == (len(data), 32, 32, 3)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split 'dev'; known: train, val, test"):
        load_split(SMALL, "dev")


# ------------------------------------------------------------------------------ real image files
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _two_halves(path: Path, size: tuple[int, int], left: tuple, right: tuple) -> Path:
    """A real image file whose left half is one colour and right half another."""
    w, h = size
    img = Image.new("RGB", size, left)
    ImageDraw.Draw(img).rectangle((w // 2, 0, w, h), fill=right)
    img.save(path)
    return path


def _bands(path: Path, size: tuple[int, int], colours: list[tuple]) -> Path:
    """Horizontal bands of equal height, top to bottom."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for i, c in enumerate(colours):
        draw.rectangle((0, i * h // len(colours), w, (i + 1) * h // len(colours) - 1), fill=c)
    img.save(path)
    return path


def _close(pixels: np.ndarray, rgb: tuple, tol: int) -> bool:
    return bool((np.abs(pixels.astype(int) - np.array(rgb)) <= tol).all())


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    _two_halves(d / "wide.png", (120, 60), RED, BLUE)  # landscape: crop keeps the middle
    _bands(d / "tall.jpg", (40, 120), [GREEN, RED, BLUE])  # portrait JPEG: crop keeps red
    _two_halves(d / "sub" / "square.png", (50, 50), GREEN, RED)
    return d


def _check_real_images(data: CaptionedImages, names: list[str]) -> None:
    assert [Path(p).name for p in data.images] == names
    out = data.load_all(32)
    assert out.shape == (len(names), 32, 32, 3) and out.dtype == np.uint8
    for name, img in zip(names, out, strict=True):
        if name == "wide.png":  # 120x60 -> 64x32, centre 32 columns: red left, blue right
            assert _close(img[:, :14], RED, 2) and _close(img[:, 18:], BLUE, 2)
        elif name == "tall.jpg":  # 40x120 -> 32x96, centre 32 rows = the middle band
            assert _close(img[2:-2], RED, 40)  # JPEG is lossy
        elif name == "square.png":
            assert _close(img[:, :14], GREEN, 2) and _close(img[:, 18:], RED, 2)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_and_tsv_tables_group_captions_per_image(tmp_path, image_dir, suffix):
    sep = "\t" if suffix == ".tsv" else ","
    rows = [
        ("wide.png", "a red and blue flag"),
        ("tall.jpg", "three stripes"),
        ("wide.png", "two halves, red then blue"),  # quoted in CSV: it holds the separator
        ("sub/square.png", "green beside red"),
        ("tall.jpg", "  green red blue  "),
    ]

    def table(name: str, rows: list) -> Path:
        lines = [f"filepath{sep}caption"]
        for path, cap in rows:
            lines.append(f"{path}{sep}" + (f'"{cap}"' if sep in cap else cap))
        p = tmp_path / f"{name}{suffix}"
        p.write_text("\n".join(lines) + "\n")
        return p

    cfg = CsvData(train=table("train", rows), val=table("val", rows[3:4]), image_root=image_dir)
    train = load_split(cfg, "train")
    assert train.captions == [
        ["a red and blue flag", "two halves, red then blue"],
        ["three stripes", "green red blue"],
        ["green beside red"],
    ]
    _check_real_images(train, ["wide.png", "tall.jpg", "square.png"])
    test = load_split(cfg, "test")  # no test table: the val table
    assert test.captions == [["green beside red"]]
    assert train.name == f"train{suffix}/train"


def test_csv_image_paths_default_to_the_tables_folder_and_columns_are_configurable(tmp_path):
    _two_halves(tmp_path / "x.png", (64, 48), RED, BLUE)
    t = tmp_path / "t.csv"
    t.write_text("image,text,extra\nx.png,hello,1\n")
    cfg = CsvData(train=t, val=t, image_column="image", caption_column="text")
    data = load_split(cfg, "val")
    assert data.images == [tmp_path / "x.png"] and data.captions == [["hello"]]
    with pytest.raises(ValueError, match=r"missing column 'filepath'"):
        load_split(CsvData(train=t, val=t), "val")


def _karpathy(tmp_path: Path, image_dir: Path) -> Path:
    entries = [
        {
            "filename": "wide.png",
            "split": "train",
            "sentences": [{"raw": "A red and blue flag."}, {"raw": " Two halves. "}],
        },
        {"filename": "tall.jpg", "split": "val", "sentences": [{"raw": "Stripes."}]},
        {
            "filename": "square.png",
            "filepath": "sub",
            "split": "restval",
            "sentences": [{"raw": "Green, red."}, {"raw": "A square."}, {"raw": "Two colours."}],
        },
        {"filename": "wide.png", "split": "test", "sentences": [{"raw": "Flag again."}]},
    ]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path


def test_karpathy_json_split_selection_and_restval_in_train(tmp_path, image_dir):
    cfg = KarpathyData(path=_karpathy(tmp_path, image_dir), image_root=image_dir)
    train = load_split(cfg, "train")
    assert train.captions == [
        ["A red and blue flag.", "Two halves."],
        ["Green, red.", "A square.", "Two colours."],
    ]
    _check_real_images(train, ["wide.png", "square.png"])
    assert load_split(cfg, "val").captions == [["Stripes."]]
    assert load_split(cfg, "test").captions == [["Flag again."]]
    _check_real_images(load_split(cfg, "val"), ["tall.jpg"])


def test_real_data_through_an_experiment_file(tmp_path, image_dir):
    json_path = _karpathy(tmp_path, image_dir)
    f = tmp_path / "e.yaml"
    f.write_text(f"data: {{kind: karpathy, path: {json_path.name}, image_root: images}}\n")
    exp = load_experiment(f)
    assert len(load_split(exp.data, "train")) == 2


def test_resize_then_centre_crop_matches_a_brute_force_reference(tmp_path):
    """Reference: nearest-neighbour sampling of the centre square on a patterned image whose
    colour changes every 10 px, so centre pixels of each block survive bicubic resizing."""
    w, h = 200, 100
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(h // 10, w // 10, 3), dtype=np.uint8)
    pattern = np.kron(blocks, np.ones((10, 10, 1), np.uint8))
    Image.fromarray(pattern).save(tmp_path / "p.png")
    data = CaptionedImages([tmp_path / "p.png"], [["x"]])
    out = data.image(0, 50)  # scale 0.5: 100x50, keep columns 25..75
    ref = pattern[:, 50:150][::2, ::2]
    block_centres = np.s_[2::5, 2::5]  # 5x5 px blocks after scaling; their centres
    assert np.abs(out[block_centres].astype(int) - ref[block_centres].astype(int)).max() <= 3


def test_a_missing_image_fails_naming_the_file(tmp_path, image_dir):
    t = tmp_path / "t.csv"
    t.write_text("filepath,caption\nwide.png,a\nghost.png,b\n")
    with pytest.raises(ValueError) as err:
        load_split(CsvData(train=t, val=t, image_root=image_dir), "train")
    assert str(err.value) == f"{t}: image file not found: {image_dir / 'ghost.png'}"
    (image_dir / "tall.jpg").unlink()
    cfg = KarpathyData(path=_karpathy(tmp_path, image_dir), image_root=image_dir)
    with pytest.raises(ValueError, match=rf"image file not found: .*{re.escape('tall.jpg')}"):
        load_split(cfg, "val")


def test_a_corrupt_image_fails_naming_the_file(tmp_path, image_dir):
    bad = image_dir / "bad.png"
    good = (image_dir / "wide.png").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated PNG
    junk = image_dir / "junk.jpg"
    junk.write_bytes(b"this is not an image at all" * 10)
    t = tmp_path / "t.csv"
    t.write_text("filepath,caption\nbad.png,a\njunk.jpg,b\n")
    data = load_split(CsvData(train=t, val=t, image_root=image_dir), "train")
    for i, path in enumerate((bad, junk)):
        with pytest.raises(ValueError) as err:
            data.image(i, 32)
        assert str(err.value).startswith(f"image file unreadable: {path}")
        assert "\n" not in str(err.value)


def test_an_empty_split_and_a_broken_json_are_clear(tmp_path, image_dir):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {"images": [{"filename": "wide.png", "split": "train", "sentences": [{"raw": "x"}]}]}
        )
    )
    cfg = KarpathyData(path=path, image_root=image_dir)
    with pytest.raises(ValueError, match=r"d\.json: the test split is empty"):
        load_split(cfg, "test")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"expected a Karpathy JSON with an 'images' list"):
        load_split(cfg, "train")


def test_missing_tables_are_caught_when_the_config_loads(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("data: {kind: csv, train: train.csv, val: val.csv}\n")
    with pytest.raises(ConfigError, match=r"data\.train: file not found: .*train\.csv"):
        load_experiment(f)


def test_synthetic_data_exported_to_disk_reads_back_identically(tmp_path, capsys):
    """`clipray data` writes the synthetic dataset as PNG + CSV; `kind: csv` reads the same data."""
    from clipray.cli.main import DEFAULT_SWEEP, main

    sizes = ["--set", "data.train_size=6", "--set", "data.val_size=3", "--set", "data.test_size=3"]
    assert main(["data", "--out", str(tmp_path), *sizes]) == 0  # the default sweep's data
    exp = load_experiment(DEFAULT_SWEEP, [s for s in sizes if s != "--set"])
    csv_cfg = load_experiment(
        None,
        [
            f"data={{kind: csv, train: {tmp_path}/train.csv, val: {tmp_path}/val.csv, "
            f"test: {tmp_path}/test.csv}}"
        ],
    ).data
    for split in ("train", "val", "test"):
        original, reread = load_split(exp.data, split), load_split(csv_cfg, split)
        assert reread.captions == original.captions
        assert np.array_equal(reread.load_all(64), original.load_all(64))
    assert main(["data", "--out", str(tmp_path), *sizes]) == 2  # never overwrites
    assert "already there" in capsys.readouterr().err


def test_varied_backgrounds_keep_every_shape_a_contrast_apart():
    """backgrounds: varied: any background, each shape colour MIN_CONTRAST luma steps from it;
    captions as with the palette (they never name a colour)."""
    cfg = SyntheticData(backgrounds="varied", val_size=40, captions_per_image=1)
    data = load_split(cfg, "val")
    corners = {tuple(int(v) // 32 for v in im[0, 0]) for im in data.images}
    assert len(corners) >= 20  # backgrounds vary, not two
    for img, (caption,) in zip(data.images, data.captions, strict=True):
        assert LAYOUT_RE.findall(caption) and not set(caption.split()) & set(COLOURS)
        luma = img.astype(float) @ np.array([0.299, 0.587, 0.114])
        background = np.median(luma)
        assert np.abs(luma - background).max() >= MIN_CONTRAST - 12  # the shapes stand out
    with pytest.raises(ValueError, match="backgrounds: varied needs captions: layout"):
        SyntheticData(backgrounds="varied", captions="colour")


def _noise_sd(img: np.ndarray) -> float:
    """Pixel noise of a mostly flat image: MAD of neighbouring-pixel differences (edges are
    outliers), as a normal standard deviation of one pixel."""
    d = np.diff(img.astype(float), axis=1).ravel()
    return 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)


def test_grain_draws_each_images_noise_level_from_zero_to_grain():
    """grain 0 keeps the mild uniform +-6 texture (sd 3.74); grain 15 gives Gaussian grain whose
    sd is drawn per image from [0, 15]."""
    flat = [_noise_sd(im) for im in load_split(SyntheticData(val_size=40), "val").images]
    assert 3.2 < min(flat) and max(flat) < 4.3
    grainy = [
        _noise_sd(im) for im in load_split(SyntheticData(val_size=60, grain=15), "val").images
    ]
    assert max(grainy) < 16.5 and min(grainy) < 4 and max(grainy) > 11
    assert 5.5 < np.mean(grainy) < 9.5  # uniform on [0, 15]: mean 7.5


def test_shading_adds_one_smooth_field_to_every_channel():
    """On a flat mid-gray image: the same smooth field on every channel (so shapes keep their
    contrast with the background), its peak drawn per image from [0, shading] levels."""
    flat = np.full((64, 64, 3), 128, np.uint8)
    peaks = []
    for index in range(60):
        diff = _shade(flat, 80, [1234, 1, index]).astype(float) - 128
        assert np.array_equal(diff[..., 0], diff[..., 1]) and np.array_equal(
            diff[..., 0], diff[..., 2]
        )
        assert np.abs(np.diff(diff[..., 0], axis=0)).max() <= 12  # a few levels a pixel: no edges
        assert np.abs(np.diff(diff[..., 0], axis=1)).max() <= 12
        peaks.append(np.abs(diff).max())
    assert max(peaks) <= 80 and min(peaks) < 10 and max(peaks) > 70  # uniform on [0, 80]
    assert 30 < np.mean(peaks) < 50
    assert _shade(flat, 0, [1234, 1, 0]) is flat


def test_shading_changes_the_pixels_and_no_other_draw():
    """Captions and each image's grain (its noise level is drawn per image) stay those of the
    unshaded dataset: the field comes from a stream of its own."""
    base = dict(val_size=20, backgrounds="varied", grain=15)
    plain, shaded = (load_split(SyntheticData(**base, shading=a), "val") for a in (0, 80))
    assert plain.captions == shaded.captions
    assert not np.array_equal(plain.images, shaded.images)
    for a, b in zip(plain.images, shaded.images, strict=True):  # same grain: it cancels out, and
        bend = np.abs(np.diff(b.astype(float) - a, n=2, axis=1))  # the smooth field barely bends
        assert np.median(bend) <= 1


def test_image_files_are_decoded_in_processes_with_the_same_batches(tmp_path):
    """CSV / Karpathy training images are decoded by ``data.loader_workers`` processes, in step
    order: training matches decoding on the training thread exactly."""
    import torch

    from clipray.cli.main import main
    from clipray.core.trainer import NoHooks, build_trainer

    sizes = ["data.train_size=32", "data.val_size=8", "data.test_size=8"]
    assert main(["data", "--out", str(tmp_path), *[a for s in sizes for a in ("--set", s)]]) == 0
    table = f"data={{kind: csv, train: {tmp_path}/train.csv, val: {tmp_path}/val.csv"
    models = []
    for workers in (0, 2):
        over = [f"{table}, loader_workers: {workers}}}", "train.batch_size=8", "train.epochs=2"]
        trainer = build_trainer(load_experiment(None, over), torch.device("cpu"))
        trainer.fit(NoHooks())
        models.append(trainer.clip.model.state_dict())
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_caption_probe_speaks_the_layout_captions_language_and_changes_one_fact():
    """benchmarks/probe_captions.py (what has a model learnt?): its true captions are the training
    captions word for word, and each foil changes exactly the fact it names."""
    from benchmarks.probe_captions import FOILS, describe, foil, parse

    rng = np.random.default_rng(0)
    data = load_split(SyntheticData(val_size=64, max_shapes=4), "val")
    changed = Counter()
    for caps in data.captions:
        shapes = parse(caps[0])
        assert describe(shapes) == caps[0]
        for which in FOILS:
            other = foil(shapes, which, rng)
            if other is None:  # swap kinds: every shape of one kind
                assert len({k for _, k, _ in shapes}) == 1
                continue
            changed[which] += 1
            a, b = set(shapes), set(other)
            if which == "drop":
                assert b < a and len(a - b) == 1
                continue
            assert len(other) == len(shapes) and a != b
            assert sorted(k for _, k, _ in shapes) == sorted(k for _, k, _ in other) or (
                which == "kind" and len(a - b) == 1
            )
            keep = {"kind": (0, 2), "size": (1, 2), "place": (0, 1), "swap kinds": (0, 2)}[which]
            assert sorted(tuple(s[i] for i in keep) for s in shapes) == sorted(
                tuple(s[i] for i in keep) for s in other
            ), which
    assert min(changed.values()) >= 48
