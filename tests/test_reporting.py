"""The published ratio plot: the schemes and the RoPE extensions in two panels, siblings beside their family, and a
curve far above the rest clipped (and named) so that it does not flatten the others."""

import math

import numpy as np
import pytest

from roformer.reporting import _panels, ppl_ratio_figure, ratio_clip
from roformer.result_rows import row_base_variant, row_family, row_fine_tuned, variant_family
from roformer.study_report import _order

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


def test_reports_group_by_the_family_field_not_the_name():
    """A scheme whose name holds a dash (rope-xpos) is its own family when its rows say so; only a row without
    the field (a results.json from before) falls back to the name, which puts it with rope."""
    rows = [{"variant": v, "scheme": sch, "family": fam, "rope_scaling": "none"}
            for v, sch, fam in (("rope", "rope", "rope"), ("rope-xpos", "xpos", "rope-xpos"),
                                ("learned-32L", "learned", "learned"), ("learned", "learned", "learned"))]
    assert [row_family(r) for r in rows] == ["rope", "rope-xpos", "learned", "learned"]
    (title, curves), = _panels(rows)
    assert title == "schemes" and [(v, k) for v, _, k in curves] == [
        ("rope", "rope"), ("rope-xpos", "rope-xpos"), ("learned-32L", "learned"), ("learned", "learned")]
    # the study's order: siblings beside their family, where the best of them sorts (rope-xpos best, rope worst)
    stats = {(v, 4.0): {"status": "ok", "mean": m} for v, m in (("rope", 3.0), ("rope-xpos", 1.0),
                                                                ("learned-32L", 2.0), ("learned", 2.5))}
    family = {r["variant"]: row_family(r) for r in rows}
    assert _order([r["variant"] for r in rows], stats, 4.0, family) == ["rope-xpos", "learned-32L", "learned", "rope"]
    old = [{k: v for k, v in r.items() if k != "family"} for r in rows]  # a file from before the fields
    assert row_family(old[1]) == "rope"
    assert _order([r["variant"] for r in old], stats, 4.0, {r["variant"]: row_family(r) for r in old}) == [
        "rope-xpos", "rope", "learned-32L", "learned"]


def test_row_helpers_read_the_fields_and_fall_back_to_the_name():
    new = {"variant": "mine+yarn", "rope_scaling": "yarn", "family": "fam", "fine_tuned": True, "base_variant": "mine"}
    assert (row_family(new), row_fine_tuned(new), row_base_variant(new)) == ("fam", True, "mine")
    old = {"variant": "rope-ft+yarn", "rope_scaling": "yarn"}
    assert (row_family(old), row_fine_tuned(old), row_base_variant(old)) == ("rope+yarn", True, "rope-ft")
    old = {"variant": "sinusoidal-fairseq", "rope_scaling": "none"}
    assert (row_family(old), row_fine_tuned(old), row_base_variant(old)) == ("sinusoidal", False, "sinusoidal-fairseq")
    # a zero-shot scaling on a BCA checkpoint: its base is the BCA variant (the name alone cannot say that)
    bca = {"variant": "rope+yarn+bca", "rope_scaling": "yarn", "base_variant": "rope+bca"}
    assert row_base_variant(bca) == "rope+bca"
