"""`train.py --help` and `evaluate.py --help` print the project's usage; the plots have plain tick labels and the
ratio plot draws ppl / ppl at the training length."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from roformer.positional import SCHEMES
from roformer.reporting import (
    per_position_figure,
    ppl_ratio_figure,
    ppl_vs_length_figure,
    write_outputs,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def run_side_by_side(commands: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """Each command's (return code, stdout, stderr); run at once, as each one imports torch (seconds)."""
    procs = {k: subprocess.Popen([sys.executable, *a], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, a in commands.items()}  # fmt: skip
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        out[k] = (p.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def helps():
    return run_side_by_side({"train": ["train.py", "--help"], "evaluate": ["evaluate.py", "--help"],
                             "train_fast": ["train.py", "debug=fast", "pos=alibi", "--help"]})  # fmt: skip


def accepted_groups(entry_config: str) -> set[str]:
    """The config groups an entry config's defaults list selects (hydra's own left out)."""
    groups = set()
    for item in OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{entry_config}.yaml"))["defaults"]:
        if isinstance(item, dict):
            key = next(iter(item)).removeprefix("optional ").removeprefix("override ")
            if not key.startswith("hydra"):
                groups.add(key)
    return groups


def listed_groups(text: str) -> dict[str, list[str]]:
    """The 'Config groups' section of a help page: group -> its options as printed."""
    section = text.split("Config groups", 1)[1].split("\n\n", 1)[0]
    return {m[1]: m[2].split(", ") for m in re.finditer(r"(?m)^  (\w+) +(\w+(?:, \w+)*)", section)}


@pytest.mark.parametrize("app", ["train", "evaluate"])
def test_help_lists_exactly_the_groups_the_entry_point_accepts(helps, app):
    rc, text, err = helps[app]
    assert rc == 0, err[-2000:]
    groups = listed_groups(text)
    assert set(groups) == accepted_groups(app)
    for g, options in groups.items():  # written out in the help config: they must follow configs/<group>/
        assert options == sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")), g


def test_train_help(helps):
    rc, text, err = helps["train"]
    assert rc == 0, err[-2000:]
    assert text.startswith("train.py: train one RoFormer-style language model")
    assert "python train.py [GROUP=OPTION ...] [KEY=VALUE ...]" in text
    for example in (
        "python train.py debug=fast",
        "python train.py -m pos=rope,sinusoidal",
        "trainer.resume=auto",
        "torchrun --nproc_per_node=2 train.py",
        "python train.py -m experiment=pos_sweep",
    ):
        assert example in text, example
    assert listed_groups(text)["pos"] == sorted(SCHEMES)  # ${schemes:}: the registry
    linear = sorted(n for n, c in SCHEMES.items() if c.supports_linear)
    assert f"linear: RoFormer 3.3, with {', '.join(linear)}\n" in text  # ${schemes:linear}
    reads = ", ".join(f"pos.{k}" for k in sorted(SCHEMES["rope"].options))  # ${reads:rope}: the scheme's options
    assert f"pos.KEY=VALUE   # pos=rope reads {reads}\n" in text
    # the values come from the composed config
    assert "This command line selects: model=small pos=rope data=wikitext2 optim=adamw logger=wandb" in text
    assert "trainer.max_steps=600 " in text and "trainer.seq_len=256 " in text
    assert "study" not in text  # configs/study/ is run_study.py's, not a group train.py accepts
    assert "$" not in text and "${" not in text


def test_train_help_shows_the_values_of_its_command_line(helps):
    rc, text, err = helps["train_fast"]
    assert rc == 0, err[-2000:]
    assert "selects: model=tiny pos=alibi" in text and "logger=none" in text
    assert "trainer.max_steps=20 " in text


def test_evaluate_help(helps):
    rc, text, err = helps["evaluate"]
    assert rc == 0, err[-2000:]
    assert text.startswith("evaluate.py: perplexity of trained checkpoints")
    assert "python evaluate.py ckpt=CHECKPOINTS [data=OPTION] [logger=OPTION]" in text
    for needle in (
        "ckpt=",
        "eval.lengths=[]",
        "eval.rope_scaling=",
        "eval.protocols=",
        "data=sotu",
        "ppl_ratio_vs_length.png",
        "python evaluate.py ckpt=multirun/",
    ):
        assert needle in text, needle
    assert set(listed_groups(text)) == {"data", "logger"}
    for other in ("pos=", "model=", "experiment=", "optim=", "debug="):  # evaluate.py rejects these groups
        assert other not in text, other
    assert "$" not in text and "${" not in text


@pytest.mark.slow
def test_hydra_help_still_works():
    for app, (rc, text, err) in run_side_by_side(
        {a: [f"{a}.py", "--hydra-help"] for a in ("train", "evaluate")}
    ).items():
        assert rc == 0, (app, err[-2000:])
        assert text.startswith("Hydra (") and "== Flags ==" in text and "hydra/launcher" in text, app


# --- plots -------------------------------------------------------------------------------------------------------

TRAIN_LEN = 64
LENGTHS = (64, 96, 128, 256, 512)


def ppl_of(variant: str, seed: int, L: int) -> float:
    """Made-up perplexities in the thousands (where matplotlib's log axis writes 3x10^3) that grow with L."""
    growth = {"rope": 0.5, "alibi": 0.0, "sinusoidal": 1.5, "rope+yarn": 0.2, "learned": 0.0}[variant]
    return 2500.0 * (1 + 0.03 * seed) * (L / TRAIN_LEN) ** growth


@pytest.fixture
def results():
    rows = []
    for variant, scaling, seeds in (("rope", "none", (0, 1, 2)), ("alibi", "none", (0, 1)),
                                    ("sinusoidal", "none", (0,)), ("rope+yarn", "yarn", (0, 1, 2)),
                                    ("learned", "none", (0,))):  # fmt: skip
        for seed in seeds:
            for protocol in ("nonoverlapping", "sliding"):
                for L in LENGTHS:
                    na = variant == "learned" and L > TRAIN_LEN
                    rows.append({"label": f"{variant.split('+')[0]},seed={seed}", "variant": variant,
                                 "scheme": variant.split("+")[0], "rope_scaling": scaling, "seed": seed,
                                 "train_len": TRAIN_LEN, "protocol": protocol, "length": L,
                                 "status": "n/a" if na else "ok", "note": "n/a (table size 64)" if na else "",
                                 "ppl": None if na else ppl_of(variant, seed, L), "ratio": None, "nll_sum": 1.0,
                                 "tokens": 512, "bytes": 2048, "words": 400, "bits_per_byte": 1.0,
                                 "word_ppl": 10.0})  # fmt: skip
    per_position = [{"label": f"{v},seed=0", "variant": v, "rope_scaling": "none", "length": 512,
                     "mean_loss": list(5 + 1 / np.sqrt(np.arange(1, 513)))} for v in ("rope", "alibi")]  # fmt: skip
    return {
        "format": {"name": "roformer-eval", "version": 1},
        "settings": {"split": "test"},
        "checkpoints": [{"label": "x", "train_len": TRAIN_LEN}],
        "results": rows,
        "per_position": per_position,
    }


def tick_texts(fig) -> list[tuple[str, list[str]]]:
    """(axis name, its tick label texts) for every axis of every drawn panel, after drawing the figure."""
    fig.canvas.draw()
    out = []
    for ax in fig.axes:
        if ax.axison:
            out.append((f"{ax.get_title()} x", [t.get_text() for t in ax.get_xticklabels(which="both")]))
            out.append((f"{ax.get_title()} y", [t.get_text() for t in ax.get_yticklabels(which="both")]))
    return out


@pytest.mark.parametrize("make", [ppl_vs_length_figure, ppl_ratio_figure, per_position_figure])
def test_tick_labels_are_plain_numbers(results, make):
    for axis, texts in tick_texts(make(results)):
        shown = [t for t in texts if t]
        assert len(shown) >= 2, (axis, texts)
        for t in shown:
            assert "×" not in t and "mathdefault" not in t and "^" not in t and "$" not in t, (axis, t)
            float(t)  # a plain number
        if axis.endswith(" x") and make is not per_position_figure:
            assert {"64", "128", "256"} <= set(shown), (axis, shown)


def panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def line(ax, label: str):
    return next(ln for ln in ax.get_lines() if ln.get_label() == label)


def test_ratio_curve_is_the_mean_over_seeds_of_ppl_over_ppl_at_the_training_length(results):
    fig = ppl_ratio_figure(results)
    for title, variant, seeds in (("nonoverlapping: schemes", "rope", (0, 1, 2)),
                                  ("sliding: schemes", "alibi", (0, 1)),
                                  ("nonoverlapping: RoPE scaling, zero-shot", "rope+yarn", (0, 1, 2))):  # fmt: skip
        ln = line(panel(fig, title), variant)
        expected = [np.mean([ppl_of(variant, s, L) / ppl_of(variant, s, TRAIN_LEN) for s in seeds]) for L in LENGTHS]
        np.testing.assert_array_equal(ln.get_xdata(), LENGTHS)
        np.testing.assert_allclose(ln.get_ydata(), expected, rtol=1e-12)
    ax = panel(fig, "nonoverlapping: schemes")
    assert any(list(ln.get_ydata()) == [1, 1] for ln in ax.get_lines())  # the line at 1
    assert any(list(ln.get_xdata()) == [TRAIN_LEN] * 2 and ln.get_linestyle() == ":" for ln in ax.get_lines())
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")] == [
        "rope",
        "alibi",
        "sinusoidal",
        "learned (n/a beyond 64)",
    ]  # RoPE scaling has its own row
    assert [ln.get_label() for ln in panel(fig, "sliding: RoPE scaling, zero-shot").get_lines()
            if not ln.get_label().startswith("_")] == ["rope (no scaling)", "rope+yarn"]  # fmt: skip


def test_ppl_curve_is_the_mean_over_seeds(results):
    ln = line(panel(ppl_vs_length_figure(results), "sliding: schemes"), "alibi")
    np.testing.assert_allclose(ln.get_ydata(), [np.mean([ppl_of("alibi", s, L) for s in (0, 1)]) for L in LENGTHS])


def test_write_outputs_writes_the_ratio_plot_when_there_is_a_training_length_cell(results, tmp_path):
    names = [p.name for p in write_outputs(results, tmp_path / "a")]
    assert names == ["results.json", "results.csv", "results.md", "ppl_vs_length.png", "ppl_ratio_vs_length.png",
                     "per_position.png"]  # fmt: skip
    assert (tmp_path / "a" / "ppl_ratio_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results["results"] = [r for r in results["results"] if r["length"] != TRAIN_LEN]  # nothing to divide by
    names = [p.name for p in write_outputs(results, tmp_path / "b")]
    assert "ppl_ratio_vs_length.png" not in names and "ppl_vs_length.png" in names
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted(names)
