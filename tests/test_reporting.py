"""The published ratio plot: the schemes and the RoPE extensions in two panels, siblings beside their family, and a
curve far above the rest clipped (and named) so that it does not flatten the others."""

import math

import numpy as np
import pytest

from roformer.reporting import ppl_ratio_figure, ratio_clip, variant_family

L = 128
LENGTHS = (128, 256, 512, 1024, 3072)
GROWTH = {  # variant -> (rope_scaling, ratio at 24 L); ratio at n = (n / L) ** log_24(ratio at 24 L)
    "rope": ("none", 1.13), "sinusoidal": ("none", 3.0), "sinusoidal-fairseq": ("none", 6.0),
    "learned-32L": ("none", 1.2), "alibi": ("none", 0.99), "rope+linear": ("none", 1.08),
    "rope+pi": ("pi", 1.27), "rope+yarn": ("yarn", 1.21), "rope+linear+pi": ("pi", 1.07),
}  # fmt: skip


def ratio(variant: str, seed: int, n: int) -> float:
    return (n / L) ** (math.log(GROWTH[variant][1]) / math.log(24)) * (1 + 0.01 * seed * (n > L))


@pytest.fixture
def results() -> dict:
    rows = []
    for variant, (scaling, _) in GROWTH.items():
        for seed in (0, 1):
            for n in LENGTHS:
                rows.append({"label": f"{variant.split('+')[0]},seed={seed}", "variant": variant, "scheme": "x",
                             "rope_scaling": scaling, "seed": seed, "train_len": L, "protocol": "nonoverlapping",
                             "length": n, "status": "ok", "note": "", "ppl": 300 * ratio(variant, seed, n),
                             "ratio": None})  # fmt: skip
    rows += [{**r, "protocol": "sliding"} for r in rows]
    return {"settings": {"split": "test"}, "checkpoints": [{"label": "x", "train_len": L}], "results": rows,
            "per_position": []}  # fmt: skip


def test_ratio_clip():
    assert ratio_clip([1.0, 1.05, 1.1, 1.13]) is None  # nothing stands out
    assert ratio_clip([0.99, 1.05, 1.08, 1.13, 3.0]) == pytest.approx(1.13 * 1.08)
    assert ratio_clip([1.0, 1.2]) is None  # below 1.25 nothing is clipped
    assert ratio_clip([0.93, 1.1, 2.0, 3.5, 10.0, 100.0]) == pytest.approx(10.0 * 1.08)  # a better-trained study


def test_variant_family():
    assert [variant_family(v) for v in ("learned-32L", "sinusoidal-fairseq", "rope+pi", "rope+linear", "rope")] == [
        "learned", "sinusoidal", "rope+pi", "rope+linear", "rope"]


def test_published_ratio_plot(results):
    fig = ppl_ratio_figure(results, ["nonoverlapping"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["nonoverlapping: schemes", "nonoverlapping: RoPE scaling, zero-shot"]
    schemes, scaling = (next(ax for ax in fig.axes if ax.get_title() == t) for t in titles)
    lines = {ln.get_label(): ln for ln in schemes.get_lines() if not ln.get_label().startswith("_")}
    assert list(lines) == ["rope", "sinusoidal", "sinusoidal-fairseq", "learned-32L", "alibi", "rope+linear"]
    assert lines["sinusoidal-fairseq"].get_color() == lines["sinusoidal"].get_color()  # a family, one colour
    assert lines["sinusoidal-fairseq"].get_linestyle() == "--" and lines["sinusoidal"].get_linestyle() == "-"
    np.testing.assert_allclose(lines["rope"].get_ydata(), [np.mean([ratio("rope", s, n) for s in (0, 1)])
                                                           for n in LENGTHS])  # fmt: skip
    # the sinusoidal curves run off the top, named there; the rest keep the panel
    lo, hi = schemes.get_ylim()
    kept = max(max(ln.get_ydata()) for v, ln in lines.items() if not v.startswith("sinusoidal"))
    assert hi == pytest.approx(kept * 1.08) and lo < 0.99
    assert schemes.get_yscale() == "log" and schemes.xaxis.get_transform().base == 2
    notes = [t.get_text() for t in schemes.texts]
    peak = {v: np.mean([ratio(v, s, LENGTHS[-1]) for s in (0, 1)]) for v in ("sinusoidal", "sinusoidal-fairseq")}
    assert notes == [f"off the top: sinusoidal (up to {peak['sinusoidal']:.3g}×), "
                     f"sinusoidal-fairseq (up to {peak['sinusoidal-fairseq']:.3g}×)"]  # fmt: skip
    labels = [ln.get_label() for ln in scaling.get_lines() if not ln.get_label().startswith("_")]
    assert labels == ["rope (no scaling)", "rope+pi", "rope+yarn", "rope+linear (no scaling)", "rope+linear+pi"]
    assert not scaling.texts  # nothing to clip there
