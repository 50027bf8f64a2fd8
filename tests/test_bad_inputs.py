"""Every bad input refused cleanly: a catalogue of bad inputs, one parametrized case each.

For every case, through the real command line (``clipray.cli.main.main``) on real files (PNG and
JPEG images written with PIL, CSV/TSV tables, Karpathy JSON, torch checkpoints, YAML), in a
fresh directory: exit status 2; stderr exactly one line, ``clipray: error: `` and the words that
name the file or field and what was expected; no traceback; under 400 characters; nothing new in
the directory (storage and output directories are inside it) and every file there byte-identical;
no Ray runtime started (sweep and resume cases fail in their pre-flight); a few seconds at most.

The catalogue's size per category is in README.md ("### Bad input"); the last test keeps the two
equal.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import resource
import socket
import struct
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import clipray.cli.check  # noqa: F401  (torch, open_clip: imported before any case is measured)
from clipray.cli.main import main

REPO = Path(__file__).resolve().parent.parent
MAX_STDERR = 400
MAX_SECONDS = 10.0  # per case, measured; pytest-timeout stops a hang at 30
MAX_RSS_GROWTH_MB = 200  # peak memory growth of a case marked ``bounded``

TMP = "<tmp>"  # replaced by the case's directory in argv, words, env and text files
PORT = "<closed-port>"  # replaced by a port nothing listens on

Content = str | bytes | Callable[[Path], str | bytes] | None  # None: a directory


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    argv: tuple[str, ...]
    words: tuple[str, ...]
    files: Mapping[str, Content] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    bounded: bool = False  # also assert peak memory growth


CASES: list[Case] = []


def case(category: str, name: str, argv: list[str], words: list[str], files=None, **kw) -> None:
    CASES.append(Case(category, name, tuple(argv), tuple(words), dict(files or {}), **kw))


# ------------------------------------------------------------------------------- real files
def _image(fmt: str, size: tuple[int, int] = (48, 40), noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        if noise
        else np.full((size[1], size[0], 3), (200, 40, 40), dtype=np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def png(tmp: Path | None = None) -> bytes:
    return _image("PNG")


def jpeg(tmp: Path | None = None) -> bytes:
    return _image("JPEG")


def truncated_png(tmp: Path) -> bytes:
    data = _image("PNG", (96, 96), noise=True)
    return data[: len(data) // 2]


def truncated_jpeg(tmp: Path) -> bytes:
    data = _image("JPEG", (96, 96), noise=True)
    return data[: len(data) // 2]


def bomb_png(tmp: Path) -> bytes:
    """A 300-byte PNG whose header claims 30000 x 30000 pixels (PIL's decompression-bomb check)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


GOOD_IMAGES: dict[str, Content] = {"img/a.png": png, "img/b.jpg": jpeg, "img/c.png": png}
CSV_EXP = "data: {kind: csv, train: train.csv, val: val.csv, image_root: img}\n" + (
    "train: {batch_size: 2, epochs: 1, warmup_steps: 1}\n"
)
TSV_EXP = CSV_EXP.replace("train.csv", "train.tsv").replace("val.csv", "val.tsv")
GOOD_CSV = "filepath,caption\na.png,a red square\nb.jpg,a red photo\nc.png,red again\n"
GOOD_TSV = GOOD_CSV.replace(",", "\t")


def csv_files(train: Content = GOOD_CSV, val: Content = GOOD_CSV, **images: Content) -> dict:
    return {**GOOD_IMAGES, **{f"img/{k}": v for k, v in images.items()}, "e.yaml": CSV_EXP} | {
        "train.csv": train,
        "val.csv": val,
    }


def karpathy(entries: object) -> dict[str, Content]:
    return {
        **GOOD_IMAGES,
        "e.yaml": "data: {kind: karpathy, path: d.json, image_root: img}\n"
        "train: {batch_size: 2, epochs: 1, warmup_steps: 1}\n",
        "d.json": json.dumps(entries),
    }


def entry(name: str = "a.png", split: str = "train", **kw: object) -> dict:
    return {"filename": name, "split": split, "sentences": [{"raw": "a red square"}], **kw}


def kp_images(first: object, split: str = "train") -> dict[str, Content]:
    """A Karpathy file whose first entry is ``first``; the rest make valid splits."""
    rest = [entry("b.jpg"), entry("c.png"), entry("a.png", "val"), entry("b.jpg", "test")]
    return karpathy({"images": [first, *rest]})


TINY_YAML = (
    "data: {train_size: 64, val_size: 16, test_size: 16}\n"
    "train: {batch_size: 16, epochs: 1, warmup_steps: 2}\n"
)
SPACE_YAML = "perturb.epsilon: {type: uniform, low: 0.0, high: 0.1}\n"
SWEEP_YAML = (
    "name: s\n"
    + TINY_YAML
    + "eval: {corruptions: [fog], severities: [1]}\nsweep: {space: s.yaml, num_samples: 2}\n"
)
SWEEP_FILES: dict[str, Content] = {"e.yaml": SWEEP_YAML, "s.yaml": SPACE_YAML}
SWEEP = ["sweep", "e.yaml"]


def alias_bomb(levels: int, indent: str = "    ") -> str:
    """A "billion laughs": ``levels`` anchors, each a list of nine aliases of the previous."""
    lines = [f"{indent}- &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"{indent}- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def flow_bomb(levels: int) -> str:
    """The same on one line, for ``--set``: a list holding the anchored lists."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "[" + ", ".join(parts) + "]"


# ------------------------------------------------------------------------- real checkpoints
@cache
def _blob() -> dict:
    """A real training checkpoint of the tiny config (a Trainer's state before any step)."""
    from clipray.config.loading import experiment_from_dict
    from clipray.core.trainer import build_trainer

    exp = experiment_from_dict(yaml.safe_load(TINY_YAML))
    return build_trainer(exp, torch.device("cpu")).state_dict()


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def good_ckpt(tmp: Path) -> bytes:
    return _saved(_blob())


def truncated_ckpt(tmp: Path) -> bytes:
    data = good_ckpt(tmp)
    return data[: len(data) // 2]


def ckpt_without(key: str) -> Callable[[Path], bytes]:
    return lambda tmp: _saved({k: v for k, v in _blob().items() if k != key})


def ckpt_with(**parts: object) -> Callable[[Path], bytes]:
    return lambda tmp: _saved({**_blob(), **parts})


def rn_weights(tmp: Path) -> bytes:
    """The checkpoint of the ViT config holding a ResNet's weights."""
    from clipray.config.schema import ModelConfig
    from clipray.core.model import build_model

    torch.manual_seed(0)
    return _saved(
        {**_blob(), "model": build_model(ModelConfig(name="clipray-tiny-rn")).model.state_dict()}
    )


def state_dict_only(tmp: Path) -> bytes:
    return _saved(_blob()["model"])


def code_pickle(tmp: Path) -> bytes:
    return pickle.dumps(os.getcwd, protocol=2)  # a global: refused by torch.load(weights_only=True)


# ---------------------------------------------------------------------- real sweep manifests
def manifest(**changes: object) -> Callable[[Path], str]:
    """The manifest a sweep of SWEEP_YAML (storage runs/) writes, with ``changes``."""

    def make(tmp: Path) -> str:
        from clipray.config.loading import load_experiment

        exp = load_experiment(tmp / "e.yaml")
        saved = {
            "sweep_id": "s-1234",
            "directory": str(tmp / "runs" / "s"),
            "experiment": exp.to_dict(),
            "space": {"perturb.epsilon": {"type": "uniform", "low": 0.0, "high": 0.1}},
            "tracking": {
                "uri": f"sqlite:///{tmp / 'runs' / 'mlflow.db'}",
                "experiment_id": "1",
                "parent_run_id": "r1",
            },
        }
        saved.update(changes)
        return json.dumps(saved)

    return make


MANIFEST = "runs/s/clipray_sweep.json"


def sweep_dir(content: Content, *, db: bool = True, **extra: Content) -> dict[str, Content]:
    files: dict[str, Content] = {**SWEEP_FILES, MANIFEST: content, **extra}
    if db:
        files["runs/mlflow.db"] = b""  # the store exists (what report checks); never opened
    return files


# =============================================================================== the catalogue
# ------------------------------------------------------------------------- experiment files
E = "experiment file"
CHECK = ["check", "e.yaml"]
for name, text, words in [
    ("unclosed-flow", "train: {epochs: [\n", ["not valid YAML", "line 2"]),
    ("tab-indent", "train:\n\tepochs: 2\n", ["not valid YAML"]),
    ("undefined-alias", "train: *nowhere\n", ["not valid YAML"]),
    ("python-tag", "train: !!python/object/apply:os.getcwd []\n", ["not valid YAML"]),
    ("unhashable-key", "train: {[1, 2]: 3}\n", ["not valid YAML"]),
    ("two-documents", "seed: 1\n---\nseed: 2\n", ["not valid YAML"]),
    ("deep-nesting", "train: " + "[" * 3000 + "]" * 3000 + "\n", ["not valid YAML"]),
    ("top-level-list", "- train\n- eval\n", ["expected a mapping of sections"]),
    ("top-level-scalar", "42\n", ["expected a mapping of sections"]),
    ("empty", "", ["empty file", "expected a mapping of sections"]),
    ("only-comments", "# nothing yet\n", ["empty file"]),
    ("only-blank-lines", "\n   \n\n", ["empty file"]),
    ("cp1252", "name: caf\x96\n".encode("latin-1"), ["not UTF-8", "0x96"]),
    ("utf16", "seed: 1\n".encode("utf-16"), ["not UTF-8", "0xff"]),
    ("binary", bytes(range(256)) * 8, ["not UTF-8"]),
    ("nul-byte", "name: a\x00b\n", ["not valid YAML"]),
    ("megabytes", "# " + "x" * (2 << 20) + "\n", ["larger than 1024 KiB"]),
    ("alias-bomb", "train:\n  epochs:\n" + alias_bomb(9), ["expands to more than"]),
    ("alias-bomb-deeper", "train:\n  epochs:\n" + alias_bomb(10), ["expands to more than"]),
    ("self-alias", "train:\n  epochs: &a [*a]\n", ["expands to more than"]),
    ("unknown-key", "colour: red\n", ["colour", "unknown key"]),
    ("unknown-nested-key", "train: {epochz: 3}\n", ["train.epochz", "unknown key"]),
    ("huge-key", "train: {" + "k" * 1000 + ": 1}\n", ["train.kkk", "unknown key"]),
    ("section-not-mapping", "train: 5\n", ["train", "got 5"]),
    ("wrong-type", "train: {epochs: two}\n", ["train.epochs", "integer"]),
    ("float-for-int", "train: {epochs: 2.5}\n", ["train.epochs", "integer"]),
    ("below-range", "train: {epochs: 0}\n", ["train.epochs", "greater than or equal to 1"]),
    ("negative-lr", "train: {lr: -0.1}\n", ["train.lr", "greater than 0"]),
    ("infinite-lr", "train: {lr: .inf}\n", ["train.lr", "finite"]),
    ("beta-of-1", "train: {betas: [0.9, 1.0]}\n", ["train.betas.1", "less than 1"]),
    ("one-beta", "train: {betas: [0.9]}\n", ["train.betas", "required"]),
    ("nan-epsilon", "perturb: {epsilon: .nan}\n", ["perturb.epsilon", "finite"]),
    ("huge-integer", "train: {lr: " + "9" * 5000 + "}\n", ["not valid YAML", "4300 digits"]),
    ("huge-float", "train: {lr: " + "9" * 5000 + ".5}\n", ["train.lr", "finite"]),
    ("adv-weight-above-1", "perturb: {adv_weight: 2}\n", ["perturb.adv_weight"]),
    ("unknown-tower", "perturb: {tower: audio}\n", ["perturb.tower", "'image'"]),
    ("layer-beyond-depth", "perturb: {layer: 9}\n", ["perturb.layer", "depth"]),
    ("unknown-data-kind", "data: {kind: parquet}\n", ["data", "unknown kind", "parquet"]),
    ("csv-without-train", "data: {kind: csv, val: v.csv}\n", ["data.train", "required"]),
    ("unknown-model", "model: {name: ViT-Nope}\n", ["model.name", "unknown model"]),
    ("huge-model-name", "model: {name: " + "x" * 5000 + "}\n", ["model.name", "unknown model"]),
    ("unknown-pretrained-tag", "model: {pretrained: laion9000}\n", ["model.pretrained"]),
    ("missing-weights", "model: {pretrained: w/gone.pt}\n", ["model.pretrained", "not found"]),
    ("unknown-corruption", "eval: {corruptions: [smudge]}\n", ["eval.corruptions", "smudge"]),
    ("corruptions-a-string", "eval: {corruptions: fog}\n", ["eval.corruptions"]),
    ("severity-6", "eval: {severities: [6]}\n", ["eval.severities", "1-5"]),
    ("max-images-0", "eval: {max_images: 0}\n", ["eval.max_images"]),
    ("unknown-precision", "train: {precision: fp8}\n", ["train.precision"]),
    ("name-with-slash", "name: ../escape\n", ["name", "pattern"]),
    ("name-too-long", "name: " + "a" * 300 + "\n", ["name", "at most 100"]),
    ("negative-seed", "seed: -1\n", ["seed", "greater than or equal to 0"]),
    ("huge-seed", "seed: 99999999999999999999\n", ["seed", "4294967295"]),
    ("empty-storage", 'storage: ""\n', ["storage"]),
    ("uneven-batch", "train: {batch_size: 10, num_workers: 3}\n", ["train.batch_size", "evenly"]),
    ("unknown-sampler", "sweep: {searcher: {sampler: bayes}}\n", ["sweep.searcher.sampler"]),
    ("missing-space", "sweep: {space: gone.yaml}\n", ["sweep.space", "file not found"]),
    ("nul-in-path", 'data: {kind: csv, train: "a\\0b.csv", val: v.csv}\n', ["data.train"]),
]:
    bounded = name.startswith(("alias", "self-alias", "megabytes", "deep"))
    case(E, name, CHECK, ["e.yaml", *words], {"e.yaml": text}, bounded=bounded)
case(E, "missing-file", ["check", "nope.yaml"], ["nope.yaml", "file not found"])
case(E, "a-directory", ["check", "conf"], ["conf", "not a regular file"], {"conf": None})
case(
    E,
    "train-empty-file",
    ["train", "e.yaml", "--out", "out"],
    ["e.yaml", "empty file"],
    {"e.yaml": ""},
)
case(E, "sweep-empty-file", ["sweep", "e.yaml"], ["e.yaml", "empty file"], {"e.yaml": "# x\n"})
for name, sets, words in [
    ("sweep-unknown-metric", ["sweep.metric=agg/nope"], ["sweep.metric", "agg/nope"]),
    (
        "sweep-asha-metric",
        ["sweep.asha.enabled=true", "sweep.asha.metric=train/loss"],
        ["sweep.asha.metric"],
    ),
    (
        "sweep-mce-without-baseline",
        ["sweep.baseline=false", "sweep.metric=agg/mce"],
        ["sweep.metric", "baseline"],
    ),
    (
        "sweep-grid-with-uniform",
        ["sweep.searcher.sampler=grid"],
        ["sweep.searcher.sampler", "grid"],
    ),
]:
    case(E, name, [*SWEEP, *[a for s in sets for a in ("--set", s)]], words, SWEEP_FILES)

# ---------------------------------------------------------------------------- --set overrides
S = "--set override"
for name, value, words in [
    ("unclosed-bracket", "train.epochs=[1", ["--set train.epochs", "not valid YAML"]),
    ("unclosed-brace", "data={kind: csv", ["--set data", "not valid YAML"]),
    ("unclosed-quote", "name='abc", ["--set name", "not valid YAML"]),
    ("no-equals", "train.epochs", ["section.key=value"]),
    ("no-key", "=5", ["section.key=value"]),
    ("unknown-key", "train.epochz=3", ["train.epochz", "unknown key"]),
    ("unknown-section", "trian.epochs=3", ["trian", "unknown key"]),
    ("empty-path-part", "train..epochs=1", ["train", "unknown key"]),
    ("into-a-value", "train.epochs.x=1", ["train.epochs", "integer"]),
    ("wrong-type", "train.epochs=two", ["train.epochs", "integer"]),
    ("empty-value", "train.epochs=", ["train.epochs", "got None"]),
    ("out-of-range", "train.batch_size=1", ["train.batch_size", "greater than or equal to 2"]),
    ("nul-character", "name=a\x00b", ["--set name", "not valid YAML"]),
    (
        "python-tag",
        "train.epochs=!!python/name:os.getcwd",
        ["--set train.epochs", "not valid YAML"],
    ),
    ("two-documents", "seed=1\n---\n2", ["--set seed", "not valid YAML"]),
    ("alias-bomb", "train.epochs=" + flow_bomb(10), ["--set train.epochs", "expands to more than"]),
    ("self-alias", "train.epochs=&a [*a]", ["--set train.epochs", "expands to more than"]),
    ("huge-value", "model.name=" + "x" * 20000, ["model.name", "unknown model"]),
    ("switch-kind-without-files", "data.kind=csv", ["data.train", "required"]),
    ("negative-layer", "perturb.layer=-99", ["perturb.layer", "depth"]),
    ("infinite-epsilon", "perturb.epsilon=.inf", ["perturb.epsilon", "finite"]),
]:
    case(S, name, [*CHECK, "--set", value], words, {"e.yaml": "seed: 1\n"}, bounded="bomb" in name)
case(
    S,
    "on-train",
    ["train", "e.yaml", "--out", "out", "--set", "train.epochs=[1"],
    ["--set train.epochs", "not valid YAML"],
    {"e.yaml": TINY_YAML},
)
case(S, "on-sweep", [*SWEEP, "--set", "sweep.num_samples=0"], ["sweep.num_samples"], SWEEP_FILES)
case(
    S,
    "on-score",
    ["score", "c.pt", "--set", "eval.batch_size=[1"],
    ["--set eval.batch_size", "not valid YAML"],
    {"c.pt": good_ckpt},
)

# ------------------------------------------------------------------------------ search spaces
P = "search space"
SPACE_CHECK = ["check", "search_spaces/s.yaml"]
for name, text, words in [
    ("empty", "", ["empty search space"]),
    ("only-comments", "# later\n", ["empty search space"]),
    ("a-list", "[1, 2]\n", ["expected a mapping"]),
    ("not-yaml", "perturb.layer: {type: int, low: 0\n", ["not valid YAML"]),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", ["not UTF-8", "0x89"]),
    (
        "alias-bomb",
        "perturb.steps:\n  type: choice\n  values:\n" + alias_bomb(10),
        ["expands to more than"],
    ),
    (
        "no-such-field",
        "perturb.strength: {type: uniform, low: 0, high: 1}\n",
        ["perturb.strength", "no such config field"],
    ),
    (
        "a-section-not-a-field",
        "perturb: {type: choice, values: [1]}\n",
        ["perturb", "no such config field"],
    ),
    ("spec-not-mapping", "perturb.layer: 3\n", ["perturb.layer", "expected a mapping with 'type'"]),
    ("missing-type", "perturb.layer: {low: 0, high: 3}\n", ["perturb.layer", "missing 'type'"]),
    (
        "unknown-type",
        "perturb.layer: {type: normal, low: 0, high: 3}\n",
        ["perturb.layer", "unknown type 'normal'"],
    ),
    (
        "low-above-high",
        "perturb.epsilon: {type: uniform, low: 0.3, high: 0.1}\n",
        ["perturb.epsilon", "must be below"],
    ),
    (
        "log-from-zero",
        "perturb.epsilon: {type: loguniform, low: 0, high: 0.1}\n",
        ["perturb.epsilon", "> 0"],
    ),
    (
        "infinite-bound",
        "perturb.epsilon: {type: uniform, low: 0, high: .inf}\n",
        ["perturb.epsilon.high", "finite"],
    ),
    ("empty-choice", "perturb.steps: {type: choice, values: []}\n", ["perturb.steps.values"]),
    (
        "unknown-option",
        "perturb.layer: {type: int, low: 0, high: 3, stepp: 2}\n",
        ["perturb.layer.stepp"],
    ),
    ("float-int-bound", "perturb.layer: {type: int, low: 0.5, high: 3}\n", ["perturb.layer.low"]),
    (
        "extreme-invalid",
        "perturb.layer: {type: int, low: 0, high: 9}\n",
        ["perturb.layer=9 is invalid"],
    ),
    (
        "value-invalid",
        "perturb.tower: {type: choice, values: [image, audio]}\n",
        ["perturb.tower='audio' is invalid"],
    ),
]:
    case(
        P,
        name,
        SPACE_CHECK,
        ["s.yaml", *words],
        {"search_spaces/s.yaml": text},
        bounded="bomb" in name,
    )
case(
    P,
    "empty-space-of-experiment",
    CHECK,
    ["s.yaml", "empty search space"],
    {"e.yaml": "sweep: {space: s.yaml}\n", "s.yaml": ""},
)
case(
    P,
    "sweep-missing-space-option",
    [*SWEEP, "--space", "nope.yaml"],
    ["nope.yaml", "file not found"],
    SWEEP_FILES,
)
case(
    P,
    "sweep-space-a-directory",
    [*SWEEP, "--space", "d"],
    ["d", "not a regular file"],
    {**SWEEP_FILES, "d": None},
)
case(
    P,
    "sweep-without-space",
    ["sweep", "e.yaml"],
    ["sweep.space", "no search space"],
    {"e.yaml": "name: s\n" + TINY_YAML},
)
case(
    P,
    "sweep-invalid-space",
    ["sweep", "e.yaml"],
    ["s.yaml", "perturb.layer=9"],
    {**SWEEP_FILES, "s.yaml": "perturb.layer: {type: int, low: 0, high: 9}\n"},
)

# ------------------------------------------------------------------------------------ datasets
D = "dataset"
for name, files, words in [
    (
        "csv-missing-column",
        csv_files(train="path,caption\na.png,x\n"),
        ["train.csv", "missing column 'filepath'"],
    ),
    (
        "csv-missing-caption-column",
        csv_files(train="filepath,text\na.png,x\n"),
        ["train.csv", "missing column 'caption'"],
    ),
    ("csv-empty-file", csv_files(train=""), ["train.csv", "missing column", "empty file"]),
    (
        "csv-header-only",
        csv_files(train="filepath,caption\n"),
        ["train.csv", "the train split is empty"],
    ),
    (
        "csv-blank-caption",
        csv_files(train=GOOD_CSV + "c.png,\n"),
        ["train.csv", "line 5", "empty caption"],
    ),
    (
        "csv-whitespace-caption",
        csv_files(val=GOOD_CSV + 'a.png,"   "\n'),
        ["val.csv", "line 5", "empty caption"],
    ),
    (
        "csv-empty-filepath",
        csv_files(train=GOOD_CSV + ",a caption\n"),
        ["train.csv", "line 5", "empty filepath"],
    ),
    (
        "csv-short-row",
        csv_files(train=GOOD_CSV + "a.png\n"),
        ["train.csv", "line 5", "fewer fields"],
    ),
    (
        "csv-cp1252",
        csv_files(train=(GOOD_CSV + "a.png,caf\x96\n").encode("latin-1")),
        ["train.csv", "not UTF-8", "0x96"],
    ),
    ("csv-binary", csv_files(val=png), ["val.csv", "not UTF-8", "0x89"]),
    (
        "csv-field-too-large",
        csv_files(train=GOOD_CSV + "a.png," + "w" * 200_000 + "\n"),
        ["train.csv", "not a valid table"],
    ),
    (
        "csv-missing-image",
        csv_files(train=GOOD_CSV + "gone.png,x\n"),
        ["train.csv", "image file not found", "gone.png"],
    ),
    (
        "csv-image-a-directory",
        {**csv_files(train=GOOD_CSV + "sub,x\n"), "img/sub": None},
        ["image file not found", "sub"],
    ),
    (
        "csv-text-as-png",
        csv_files(val=GOOD_CSV + "t.png,x\n", **{"t.png": "not an image"}),
        ["val.csv/val", "t.png", "not an image format"],
    ),
    (
        "csv-truncated-png",
        csv_files(val=GOOD_CSV + "t.png,x\n", **{"t.png": truncated_png}),
        ["val.csv/val", "t.png", "unreadable"],
    ),
    (
        "csv-truncated-jpeg",
        csv_files(val=GOOD_CSV + "t.jpg,x\n", **{"t.jpg": truncated_jpeg}),
        ["val.csv/val", "t.jpg", "unreadable"],
    ),
    (
        "csv-empty-image",
        csv_files(train=GOOD_CSV + "z.png,x\n", **{"z.png": b""}),
        ["train.csv/train", "z.png", "unreadable"],
    ),
    (
        "csv-decompression-bomb",
        csv_files(train=GOOD_CSV + "bomb.png,x\n", **{"bomb.png": bomb_png}),
        ["bomb.png", "decompression bomb"],
    ),
    (
        "csv-batch-beyond-rows",
        {**csv_files(), "e.yaml": CSV_EXP.replace("batch_size: 2", "batch_size: 16")},
        ["train.batch_size", "16", "3 images"],
    ),
    (
        "csv-unknown-image-column",
        {
            **csv_files(),
            "e.yaml": CSV_EXP.replace("image_root: img", "image_root: img, image_column: path"),
        },
        ["train.csv", "missing column 'path'"],
    ),
    (
        "csv-image-root-missing",
        {**csv_files(), "e.yaml": CSV_EXP.replace("image_root: img", "image_root: pics")},
        ["data.image_root", "directory not found"],
    ),
    (
        "csv-table-a-directory",
        {**csv_files(), "tables": None, "e.yaml": CSV_EXP.replace("train.csv", "tables")},
        ["data.train", "file not found"],
    ),
    (
        "tsv-comma-separated",
        {**csv_files(), "e.yaml": TSV_EXP, "train.tsv": GOOD_CSV, "val.tsv": GOOD_TSV},
        ["train.tsv", "missing column"],
    ),
    (
        "tsv-blank-caption",
        {
            **csv_files(),
            "e.yaml": TSV_EXP,
            "train.tsv": GOOD_TSV,
            "val.tsv": GOOD_TSV + "a.png\t \n",
        },
        ["val.tsv", "line 5", "empty caption"],
    ),
    (
        "tsv-cp1252",
        {
            **csv_files(),
            "e.yaml": TSV_EXP,
            "train.tsv": (GOOD_TSV + "a.png\tcaf\x96\n").encode("latin-1"),
            "val.tsv": GOOD_TSV,
        },
        ["train.tsv", "not UTF-8"],
    ),
    (
        "karpathy-not-json",
        {**karpathy({}), "d.json": "{not json"},
        ["d.json", "expected a Karpathy JSON"],
    ),
    ("karpathy-a-list", karpathy([entry()]), ["d.json", "expected a Karpathy JSON"]),
    ("karpathy-images-not-list", karpathy({"images": 5}), ["d.json", "'images' is a int"]),
    (
        "karpathy-images-numbers",
        karpathy({"images": [1, 2, 3]}),
        ["d.json: images[0]", "expected an object"],
    ),
    (
        "karpathy-no-sentences",
        kp_images({"filename": "a.png", "split": "train"}),
        ["d.json: images[0]", "'sentences'"],
    ),
    (
        "karpathy-empty-sentences",
        kp_images(entry(sentences=[])),
        ["d.json: images[0]", "non-empty 'sentences'"],
    ),
    (
        "karpathy-sentence-without-raw",
        kp_images(entry(sentences=[{"tokens": ["a"]}])),
        ["images[0].sentences[0]", "'raw'"],
    ),
    (
        "karpathy-empty-raw",
        kp_images(entry(sentences=[{"raw": ""}])),
        ["images[0].sentences[0]", "empty 'raw'"],
    ),
    (
        "karpathy-raw-not-text",
        kp_images(entry(sentences=[{"raw": 5}])),
        ["images[0].sentences[0]", "'raw' string"],
    ),
    (
        "karpathy-sentence-a-string",
        kp_images(entry(sentences=["a red square"])),
        ["images[0].sentences[0]"],
    ),
    (
        "karpathy-no-filename",
        kp_images({"split": "train", "sentences": [{"raw": "x"}]}),
        ["d.json: images[0]", "'filename'"],
    ),
    (
        "karpathy-cp1252",
        {**karpathy({}), "d.json": '{"images": ["caf\x96"]}'.encode("latin-1")},
        ["d.json", "not UTF-8"],
    ),
    (
        "karpathy-deep-nesting",
        {**karpathy({}), "d.json": "[" * 100_000 + "]" * 100_000},
        ["d.json", "expected a Karpathy JSON"],
    ),
    (
        "karpathy-missing-image",
        kp_images(entry("gone.png")),
        ["d.json", "image file not found", "gone.png"],
    ),
    (
        "karpathy-no-val-split",
        karpathy({"images": [entry(), entry("b.jpg")]}),
        ["d.json", "the val split is empty"],
    ),
    (
        "karpathy-undecodable-image",
        {**kp_images(entry()), "img/a.png": "text"},
        ["d.json/train", "a.png", "not an image format"],
    ),
    (
        "synthetic-batch-beyond-train",
        {"e.yaml": "data: {train_size: 8}\ntrain: {batch_size: 16}\n"},
        ["train.batch_size", "16", "data.train_size=8"],
    ),
    (
        "space-batch-beyond-train",
        {
            "e.yaml": TINY_YAML + "sweep: {space: s.yaml}\n",
            "s.yaml": "train.batch_size: {type: choice, values: [16, 128]}\n",
        },
        ["train.batch_size", "128", "data.train_size=64"],
    ),
]:
    case(D, name, CHECK, words, files, bounded="deep" in name)
BROKEN_VAL = csv_files(val=GOOD_CSV + "t.png,x\n", **{"t.png": truncated_png})
case(
    D,
    "train-broken-val-image",
    ["train", "e.yaml", "--out", "out"],
    ["val.csv/val", "t.png"],
    BROKEN_VAL,
)
case(
    D,
    "train-blank-caption",
    ["train", "e.yaml", "--out", "out"],
    ["train.csv", "empty caption"],
    csv_files(train=GOOD_CSV + "a.png,\n"),
)
case(
    D,
    "train-karpathy-no-sentences",
    ["train", "e.yaml", "--out", "out"],
    ["images[0]", "'sentences'"],
    kp_images({"filename": "a.png", "split": "train"}),
)
case(
    D, "data-broken-image", ["data", "e.yaml", "--out", "out"], ["val.csv/val", "t.png"], BROKEN_VAL
)
case(
    D,
    "score-broken-eval-image",
    ["score", "c.pt", "e.yaml"],
    ["t.png", "unreadable"],
    {**BROKEN_VAL, "c.pt": good_ckpt},
)
case(
    D,
    "sweep-broken-val-image",
    ["sweep", "e.yaml"],
    ["val.csv/val", "t.png"],
    {**BROKEN_VAL, "e.yaml": CSV_EXP + "sweep: {space: s.yaml}\n", "s.yaml": SPACE_YAML},
)
case(
    D,
    "sweep-batch-beyond-train",
    [*SWEEP, "--set", "data.train_size=8"],
    ["train.batch_size", "data.train_size=8"],
    SWEEP_FILES,
)
case(
    D,
    "sweep-space-batch-beyond-train",
    [*SWEEP, "--space", "b.yaml"],
    ["train.batch_size", "128"],
    {**SWEEP_FILES, "b.yaml": "train.batch_size: {type: choice, values: [16, 128]}\n"},
)


# ------------------------------------------------------------------------ webdataset shards
def shard(tmp: Path) -> bytes:
    """A real img2dataset shard of two samples (as ``clipray data --format webdataset`` writes)."""
    from clipray.core.shards import write_shards

    pixels = np.full((24, 24, 3), 120, np.uint8)
    (out,) = write_shards([(pixels, ["a grey square"])] * 2, tmp / ".shard-src", 2)
    data = out.read_bytes()
    out.unlink()
    out.parent.rmdir()
    return data


def wd_files(train: str = "s/{00000..00001}.tar", **shards: Content) -> dict[str, Content]:
    exp = (
        f"data: {{kind: webdataset, train: '{train}', train_samples: 4, val: v.tar, "
        "loader_workers: 0}\ntrain: {batch_size: 2, epochs: 1, warmup_steps: 1}\n"
    )
    return {"e.yaml": exp, "v.tar": shard, "s/00000.tar": shard, "s/00001.tar": shard} | shards


def _no_caption(data: bytes) -> bytes:
    """``data`` (a shard) without its first sample's caption members."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for info in src.getmembers():
            if not info.name.startswith("000000000.") or info.name.endswith(".jpg"):
                dst.addfile(info, src.extractfile(info))
    return out.getvalue()


TRAIN_WD = ["train", "e.yaml", "--quiet", "--out", "out"]
S3_UNREACHABLE = {  # an S3 endpoint nothing listens on; credentials so none are looked up
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}",
    "AWS_ACCESS_KEY_ID": "x",
    "AWS_SECRET_ACCESS_KEY": "x",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
for name, argv, files, words in [
    ("wd-missing-shard", CHECK, wd_files("s/{00000..00002}.tar"), ["shard not found", "00002"]),
    ("wd-not-a-tar", CHECK, wd_files(**{"s/00001.tar": "no tar\n" * 80}), ["not a readable tar"]),
    ("wd-empty-tar", CHECK, wd_files(**{"s/00001.tar": b"\0" * 10240}), ["no samples"]),
    ("wd-empty-range", CHECK, wd_files("s/{00005..00001}.tar"), ["data.train", "empty range"]),
    ("wd-empty-list", [*CHECK, "--set", "data.train=[]"], wd_files(), ["data.train", "shard"]),
    ("wd-unknown-ingest", [*CHECK, "--set", "data.ingest=spark"], wd_files(), ["data.ingest"]),
    ("wd-no-caption", CHECK, wd_files(**{"s/00000.tar": lambda t: _no_caption(shard(t))}),
     ["00000.tar", "lacks an image or a caption"]),
    ("wd-unreachable-bucket", TRAIN_WD, wd_files("s3://clipray-b/{00000..00001}.tar"),
     ["data.train", "s3://clipray-b/00000.tar", "cannot be read"]),
]:  # fmt: skip
    env = S3_UNREACHABLE if "bucket" in name else {}
    case(D, name, argv, words, files, env=env)


# --------------------------------------------------------------------------------- checkpoints
C = "checkpoint"
for name, content, words in [
    ("missing", None, ["c.pt", "file not found"]),
    ("truncated", truncated_ckpt, ["c.pt", "cannot be read"]),
    ("empty", b"", ["c.pt", "cannot be read"]),
    ("text", "model: not a checkpoint\n", ["c.pt", "cannot be read"]),
    ("code-pickle", code_pickle, ["c.pt", "cannot be read"]),
    (
        "foreign-dict",
        lambda tmp: _saved({"weights": torch.zeros(2)}),
        ["c.pt", "not a clipray training checkpoint"],
    ),
    ("state-dict-only", state_dict_only, ["c.pt", "not a clipray training checkpoint"]),
    ("no-config", ckpt_without("config"), ["c.pt", "incomplete", "'config'"]),
    ("no-model", ckpt_without("model"), ["c.pt", "incomplete", "'model'"]),
    ("no-step", ckpt_without("step"), ["c.pt", "incomplete", "'step'"]),
    ("bad-config", ckpt_with(config={"train": {"epochs": 0}}), ["c.pt", "train.epochs"]),
    ("weights-of-another-model", rn_weights, ["does not fit", "clipray-tiny-vit"]),
]:
    files = {"c.pt": content} if content is not None else {}
    case(C, f"score-{name}", ["score", "c.pt"], words, files)
case(C, "score-a-directory", ["score", "c.pt"], ["c.pt", "not a file"], {"c.pt": None})
case(
    C,
    "score-bad-severity",
    ["score", "c.pt", "--severities", "7"],
    ["eval.severities", "1-5"],
    {"c.pt": good_ckpt},
)
case(
    C,
    "score-bad-corruption",
    ["score", "c.pt", "--corruptions", "smudge"],
    ["eval.corruptions", "smudge"],
    {"c.pt": good_ckpt},
)
case(
    C,
    "score-zero-actors",
    ["score", "c.pt", "--actors", "0"],
    ["eval.scorers.num_actors"],
    {"c.pt": good_ckpt},
)
case(
    C,
    "score-empty-experiment",
    ["score", "c.pt", "e.yaml"],
    ["e.yaml", "empty file"],
    {"c.pt": good_ckpt, "e.yaml": ""},
)
RESUME = ["train", "e.yaml", "--out", "out", "--resume"]
for name, files, words in [
    ("resume-nothing", {"out": None}, ["out", "nothing to resume"]),
    (
        "resume-truncated",
        {"out/checkpoint.pt": truncated_ckpt},
        ["checkpoint.pt", "cannot be read"],
    ),
    (
        "resume-foreign",
        {"out/checkpoint.pt": state_dict_only},
        ["checkpoint.pt", "not a clipray training checkpoint"],
    ),
    (
        "resume-no-optimizer",
        {"out/checkpoint.pt": ckpt_without("optimizer")},
        ["checkpoint.pt", "'optimizer'"],
    ),
    ("resume-a-directory", {"out/checkpoint.pt": None}, ["checkpoint.pt", "not a file"]),
    (
        "resume-other-config",
        {"out/checkpoint.pt": ckpt_with(config={"seed": 5})},
        ["out", "different config"],
    ),
    (
        "resume-damaged-metrics",
        {"out/checkpoint.pt": good_ckpt, "out/metrics.jsonl": '{"step": 1}\n{"st'},
        ["metrics.jsonl", "damaged"],
    ),
    (
        "resume-binary-metrics",
        {"out/checkpoint.pt": good_ckpt, "out/metrics.jsonl": b"\x96\x00"},
        ["metrics.jsonl", "damaged"],
    ),
]:
    case(C, name, RESUME, words, {"e.yaml": TINY_YAML, **files})
case(
    C,
    "train-truncated-pretrained",
    ["train", "e.yaml", "--out", "out"],
    ["w.pt", "cannot be read"],
    {"e.yaml": TINY_YAML + "model: {pretrained: w.pt}\n", "w.pt": truncated_ckpt},
)
case(
    C,
    "train-foreign-pretrained",
    ["train", "e.yaml", "--out", "out"],
    ["w.pt", "does not fit"],
    {"e.yaml": TINY_YAML + "model: {pretrained: w.pt}\n", "w.pt": rn_weights},
)

# ---------------------------------------------------------------------------- sweep directories
W = "sweep directory"
for command in ("resume", "report"):
    case(W, f"{command}-empty-directory", [command, "d"], ["d", "not a clipray sweep"], {"d": None})
    case(
        W, f"{command}-missing-directory", [command, "nowhere"], ["nowhere", "not a clipray sweep"]
    )
    case(
        W,
        f"{command}-invalid-json",
        [command, "runs/s"],
        ["clipray_sweep.json", "not a clipray sweep manifest", "unreadable"],
        sweep_dir('{"sweep_id": '),
    )
    case(
        W,
        f"{command}-missing-keys",
        [command, "runs/s"],
        ["clipray_sweep.json", "needs sweep_id"],
        sweep_dir('{"sweep_id": "s-1"}'),
    )
    case(
        W,
        f"{command}-tracking-damaged",
        [command, "runs/s"],
        ["clipray_sweep.json", "damaged: tracking"],
        sweep_dir(manifest(tracking={"uri": 5})),
    )
for name, content, words in [
    ("a-file-not-a-directory", None, ["e.yaml", "not a clipray sweep"]),
    ("empty-manifest", "", ["clipray_sweep.json", "unreadable"]),
    ("binary-manifest", b"\x96\x00\xff", ["clipray_sweep.json", "unreadable"]),
    ("list-manifest", "[1, 2]", ["clipray_sweep.json", "needs sweep_id"]),
    (
        "experiment-not-mapping",
        manifest(experiment=[1, 2]),
        ["clipray_sweep.json", "damaged: experiment"],
    ),
    (
        "experiment-invalid",
        manifest(experiment={"name": "s", "train": {"epochs": 0}}),
        ["clipray_sweep.json", "train.epochs"],
    ),
    (
        "space-invalid",
        manifest(space={"perturb.strength": {"type": "choice", "values": [1]}}),
        ["clipray_sweep.json", "no such config field"],
    ),
    ("space-not-mapping", manifest(space=5), ["clipray_sweep.json", "damaged: space"]),
    ("renamed", manifest(experiment={"name": "other"}), ["runs/s", "must keep its name"]),
]:
    target = "e.yaml" if content is None else "runs/s"
    files = SWEEP_FILES if content is None else sweep_dir(content)
    case(W, f"resume-{name}", ["resume", target], words, files)
case(
    W,
    "resume-manifest-a-directory",
    ["resume", "runs/s"],
    ["clipray_sweep.json", "unreadable"],
    {**SWEEP_FILES, MANIFEST: None},
)
case(
    W,
    "report-store-gone",
    ["report", "runs/s"],
    ["clipray_sweep.json", "MLflow store", "is gone"],
    sweep_dir(manifest(), db=False),
)
case(
    W,
    "report-server-unreachable",
    ["report", "runs/s"],
    ["tracking.uri", "unreachable"],
    sweep_dir(
        manifest(
            tracking={"uri": f"http://127.0.0.1:{PORT}", "experiment_id": "1", "parent_run_id": "r"}
        )
    ),
)
case(
    W,
    "sweep-resume-other-config",
    [*SWEEP, "--resume"],
    ["runs/s", "different config"],
    sweep_dir(manifest(experiment={"name": "s"})),
)
case(
    W, "sweep-already-there", SWEEP, ["runs/s", "already there", "--resume"], sweep_dir(manifest())
)
case(
    W,
    "sweep-resume-nothing",
    [*SWEEP, "--resume"],
    ["runs/s", "not a clipray sweep", "nothing to resume"],
    SWEEP_FILES,
)

# ---------------------------------------------------------------------------- tracking, storage
T = "tracking and storage"
for name, sets, words, extra, env in [
    ("ftp-tracking", ["tracking.uri=ftp://x"], ["tracking.uri", "ftp://x"], {}, {}),
    ("unknown-scheme", ["tracking.uri=nosuch://host/db"], ["tracking.uri", "nosuch://"], {}, {}),
    (
        "unreachable-mlflow",
        [f"tracking.uri=http://127.0.0.1:{PORT}"],
        ["tracking.uri", "unreachable"],
        {},
        {},
    ),
    ("env-ftp-tracking", [], ["tracking.uri", "ftp://x"], {}, {"MLFLOW_TRACKING_URI": "ftp://x"}),
    (
        "sqlite-under-a-file",
        [f"tracking.uri=sqlite:///{TMP}/blocker/m.db"],
        ["tracking.uri", "blocker", "not a directory"],
        {"blocker": "x"},
        {},
    ),
    (
        "sqlite-a-directory",
        [f"tracking.uri=sqlite:///{TMP}/d"],
        ["tracking.uri", "is a directory"],
        {"d": None},
        {},
    ),
    (
        "storage-under-a-file",
        ["storage=blocker/runs"],
        ["storage", "blocker", "not a directory"],
        {"blocker": "x"},
        {},
    ),
    ("storage-a-file", ["storage=blocker"], ["storage", "blocker"], {"blocker": "x"}, {}),
    (
        "storage-unwritable",
        ["storage=/proc/clipray-bad-input"],
        ["storage", "/proc/clipray-bad-input"],
        {},
        {},
    ),
    ("storage-name-too-long", ["storage=" + "s" * 300], ["storage", "too long"], {}, {}),
    ("remote-storage-no-cache", ["storage=s3://bucket/runs"], ["eval.cache_dir", "remote"], {}, {}),
    (
        "remote-storage-no-tracking",
        ["storage=s3://bucket/runs", f"eval.cache_dir={TMP}/cache"],
        ["tracking.uri", "remote"],
        {},
        {},
    ),
    (
        "cache-under-a-file",
        ["eval.cache_dir=blocker/cache"],
        ["eval.cache_dir", "not a directory"],
        {"blocker": "x"},
        {},
    ),
]:
    argv = [*SWEEP, *[a for s in sets for a in ("--set", s)]]
    case(T, name, argv, words, {**SWEEP_FILES, **extra}, env=env)
case(
    T,
    "score-cache-under-a-file",
    ["score", "c.pt", "--set", "eval.cache_dir=blocker/c"],
    ["eval.cache_dir", "not a directory"],
    {"c.pt": good_ckpt, "blocker": "x"},
)

# -------------------------------------------------------------------------------- output paths
OUT = "output path"
TRAIN = ["train", "e.yaml", "--quiet"]
case(
    OUT,
    "train-out-under-a-file",
    [*TRAIN, "--out", "blocker/out"],
    ["--out", "blocker", "not a directory"],
    {"e.yaml": TINY_YAML, "blocker": "x"},
)
case(
    OUT,
    "train-out-a-file",
    [*TRAIN, "--out", "blocker"],
    ["--out", "blocker", "not a directory"],
    {"e.yaml": TINY_YAML, "blocker": "x"},
)
case(
    OUT,
    "train-storage-under-a-file",
    TRAIN,
    ["storage", "blocker", "not a directory"],
    {"e.yaml": TINY_YAML + "storage: blocker/runs\n", "blocker": "x"},
)
case(
    OUT,
    "train-out-name-too-long",
    [*TRAIN, "--out", "o" * 300],
    ["--out", "too long"],
    {"e.yaml": TINY_YAML},
)
case(
    OUT,
    "train-out-unwritable",
    [*TRAIN, "--out", "/proc/clipray-bad-input"],
    ["--out", "/proc/clipray-bad-input"],
    {"e.yaml": TINY_YAML},
)
case(
    OUT,
    "train-users-config-yaml",
    [*TRAIN, "--out", "out"],
    ["config.yaml", "already there"],
    {"e.yaml": TINY_YAML, "out/config.yaml": "my: own notes\n"},
)
case(
    OUT,
    "train-run-already-there",
    [*TRAIN, "--out", "out"],
    ["out", "a run is already there"],
    {"e.yaml": TINY_YAML, "out/metrics.jsonl": '{"step": 4}\n'},
)
case(
    OUT,
    "data-out-under-a-file",
    ["data", "e.yaml", "--out", "blocker/d"],
    ["--out", "not a directory"],
    {"e.yaml": TINY_YAML, "blocker": "x"},
)
case(
    OUT,
    "data-out-a-file",
    ["data", "e.yaml", "--out", "blocker"],
    ["--out", "blocker", "not a directory"],
    {"e.yaml": TINY_YAML, "blocker": "x"},
)
case(
    OUT,
    "data-dataset-already-there",
    ["data", "e.yaml", "--out", "d"],
    ["d", "a dataset is already there"],
    {"e.yaml": TINY_YAML, "d/val.csv": "filepath,caption\n"},
)
case(
    OUT,
    "data-images-already-there",
    ["data", "e.yaml", "--out", "d"],
    ["d", "a dataset is already there"],
    {"e.yaml": TINY_YAML, "d/images/train/000000.png": png},
)
case(
    OUT,
    "score-json-under-a-file",
    ["score", "c.pt", "--json", "blocker/m.json"],
    ["--json", "blocker", "not a directory"],
    {"c.pt": good_ckpt, "blocker": "x"},
)
case(
    OUT,
    "score-json-a-directory",
    ["score", "c.pt", "--json", "d"],
    ["--json", "is a directory"],
    {"c.pt": good_ckpt, "d": None},
)
case(
    OUT,
    "score-json-name-too-long",
    ["score", "c.pt", "--json", "j" * 300 + ".json"],
    ["--json", "too long"],
    {"c.pt": good_ckpt},
)
case(
    OUT,
    "report-csv-under-a-file",
    ["report", "runs/s", "--csv", "blocker/r.csv"],
    ["--csv", "blocker", "not a directory"],
    sweep_dir(manifest(), blocker="x"),
)

# ----------------------------------------------------------------------------------- RAY_ADDRESS
R = "RAY_ADDRESS"
for name, address, words in [
    ("closed-port", f"127.0.0.1:{PORT}", ["RAY_ADDRESS", f"127.0.0.1:{PORT}", "no Ray cluster"]),
    ("closed-port-localhost", f"localhost:{PORT}", ["RAY_ADDRESS", "no Ray cluster"]),
    (
        "closed-port-ray-client",
        f"ray://127.0.0.1:{PORT}",
        ["RAY_ADDRESS", "ray://", "no Ray cluster"],
    ),
    ("port-not-a-number", "127.0.0.1:gcs", ["RAY_ADDRESS", "expected host:port"]),
    ("port-out-of-range", "127.0.0.1:99999", ["RAY_ADDRESS", "expected host:port"]),
    ("no-port", "head-node", ["RAY_ADDRESS", "expected host:port"]),
]:
    case(R, name, SWEEP, words, SWEEP_FILES, env={"RAY_ADDRESS": address})
case(
    R,
    "resume-closed-port",
    ["resume", "runs/s"],
    ["RAY_ADDRESS", "no Ray cluster"],
    sweep_dir(manifest()),
    env={"RAY_ADDRESS": f"127.0.0.1:{PORT}"},
)


# ================================================================================== the checks
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fill(text: str, tmp: Path, port: int) -> str:
    return text.replace(TMP, str(tmp)).replace(PORT, str(port))


def _write(tmp: Path, files: Mapping[str, Content], port: int) -> None:
    for rel, content in files.items():
        path = tmp / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content(tmp) if callable(content) else content
        if isinstance(data, str):
            path.write_bytes(_fill(data, tmp, port).encode())
        else:
            path.write_bytes(data)


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's SHA-256, or what else it is."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", CASES, ids=[f"{c.category}:{c.name}" for c in CASES])
def test_bad_input_is_refused_cleanly(bad: Case, tmp_path, monkeypatch, capsys):
    import ray

    port = _closed_port()
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    for var, value in bad.env.items():
        monkeypatch.setenv(var, _fill(value, tmp_path, port))
    _write(tmp_path, bad.files, port)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()

    rss, t0 = _max_rss_mb(), time.perf_counter()
    code = main([_fill(a, tmp_path, port) for a in bad.argv])
    elapsed, grown = time.perf_counter() - t0, _max_rss_mb() - rss
    out, err = capsys.readouterr()

    assert code == 2, (code, err[-MAX_STDERR:])
    assert "Traceback" not in err and "Traceback" not in out
    assert len(err) < MAX_STDERR, err[:1000]
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert err.startswith("clipray: error: "), err
    for word in bad.words:
        assert _fill(word, tmp_path, port) in err, (word, err)
    assert out == "", out
    assert _snapshot(tmp_path) == before  # nothing new, nothing changed, nothing removed
    assert not ray.is_initialized()
    assert elapsed < MAX_SECONDS, elapsed
    if bad.bounded:
        assert grown < MAX_RSS_GROWTH_MB, grown


# ======================================================================== the README's table
def _readme_counts() -> dict[str, int]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Bad input", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|([^|]+)\|[^|]*\|\s*(\d+)\s*\|$", section, flags=re.M)
    return {name.strip("` "): int(count) for name, count in rows}


def test_readme_counts_the_catalogue():
    counts = Counter(c.category for c in CASES)
    assert _readme_counts() == {**counts, "total": len(CASES)}
    assert len(CASES) >= 100
    assert len({(c.category, c.name) for c in CASES}) == len(CASES)  # ids are unique
