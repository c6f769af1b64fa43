"""The extension study's report: absolute perplexity tables (mean ± std over seeds, best in bold), the winners
at <= 4 L and beyond, and the plot; write_report picks it when fine-tuned (-ft) variants are present."""

import json
import math

import numpy as np
import pytest

from roformer.extension_report import extension_figure, extension_markdown, is_extension, kind, method
from roformer.study_report import write_report

L, FT_LEN = 128, 512
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
PROTOCOLS = ("nonoverlapping", "sliding", "fixed_target")
# variant -> (train_len, rope_scaling of the rows, perplexity at each length for seed 0)
VARIANTS = {
    "rope": (L, "none", (300, 310, 360, 520, 900, 1500)),
    "rope+pi": (L, "pi", (300, 330, 350, 380, 420, 480)),
    "rope+ntk": (L, "ntk", (300, 305, 320, 350, 400, 470)),
    "rope+yarn": (L, "yarn", (300, 306, 318, 345, 390, 455)),
    "rope-ft": (FT_LEN, "none", (295, 290, 285, 400, 700, 1200)),
    "rope+pi-ft": (FT_LEN, "none", (298, 292, 280, 300, 340, 420)),
    "rope+ntk-ft": (FT_LEN, "none", (296, 289, 282, 296, 330, 400)),
    "rope+yarn-ft": (FT_LEN, "none", (297, 291, 283, 292, 320, 380)),
    "rope-ft+pi": (FT_LEN, "pi", (295, 290, 285, 310, 350, 430)),
    "rope-ft+yarn": (FT_LEN, "yarn", (295, 290, 285, 300, 335, 410)),
}


def ppl(variant: str, seed: int, protocol: str, i: int) -> float:
    """Seed 1 is 3% worse and grows a little faster; sliding is 2% better, fixed-target 5% worse."""
    p = VARIANTS[variant][2][i] * (1 + 0.03 * seed * (1 + i / 10))
    return p * {"nonoverlapping": 1.0, "sliding": 0.98, "fixed_target": 1.05}[protocol]


@pytest.fixture
def results() -> dict:
    return fake_extension_results()


def fake_extension_results() -> dict:
    """The extension study's results.json: every variant x 2 seeds x 3 protocols x 6 lengths."""
    rows, ckpts = [], []
    for variant, (train_len, scaling, _) in VARIANTS.items():
        for seed in (0, 1):
            label = f"{variant.split('+')[0] if scaling != 'none' else variant},seed={seed}"
            for protocol in PROTOCOLS:
                for i, n in enumerate(LENGTHS):
                    rows.append(dict(label=label, variant=variant, scheme="rope", rope_scaling=scaling, seed=seed,
                                     train_len=train_len, protocol=protocol, length=n, status="ok", note="",
                                     ppl=ppl(variant, seed, protocol, i), tokens=4096, words=3000, word_ppl=1.0))
            ckpts.append(dict(label=label, seed=seed, train_len=train_len, tokens_seen=10_000 * train_len,
                              variant=variant, config={"model": {}}))
    return {"settings": {"split": "test"}, "checkpoints": ckpts, "results": rows, "per_position": []}


def table(md: str, protocol: str) -> dict[str, list[str]]:
    """variant -> its cells (as written) in the ## <protocol> table."""
    section = md.split(f"\n## {protocol} (perplexity per token)\n")[1].split("\n## ")[0].split("\n![")[0]
    out = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[2:]
    return out


def expected(variant: str, protocol: str, i: int) -> tuple[float, str]:
    xs = [ppl(variant, s, protocol, i) for s in (0, 1)]
    d = 0 if np.mean(xs) >= 1000 else 1  # no decimals from 1,000 on
    return float(np.mean(xs)), f"{np.mean(xs):,.{d}f} ± {np.std(xs, ddof=1):,.{d}f}"


def test_kinds_and_methods_of_rows_without_fields():
    """A results.json written before rows had fields: the kind and method are read from the variant's name."""
    assert kind({"variant": "rope+pi", "rope_scaling": "pi"}) == "zero-shot"
    assert kind({"variant": "rope+pi-ft", "rope_scaling": "none"}) == "fine-tuned"
    assert kind({"variant": "rope-ft+pi", "rope_scaling": "pi"}) == "fine-tuned + zero-shot"
    rows = [("rope", "none"), ("rope-ft", "none"), ("rope+yarn-ft", "none"), ("rope-ft+dynamic_ntk", "dynamic_ntk"),
            ("rope+linear", "none"), ("rope+abf-ft", "none")]
    assert [method({"variant": v, "rope_scaling": m}) for v, m in rows] == [
        "none", "none", "yarn", "dynamic_ntk", "none", "none"]


def test_kinds_and_methods_come_from_the_fields_not_the_name():
    """Rows with fields: a fine-tuned checkpoint whose name does not say so, and a scheme whose name holds -ft."""
    ft = {"variant": "mine", "rope_scaling": "none", "fine_tuned": True, "train_scaling": "yarn"}
    assert (kind(ft), method(ft)) == ("fine-tuned", "yarn")
    zero_shot = {**ft, "rope_scaling": "pi"}
    assert (kind(zero_shot), method(zero_shot)) == ("fine-tuned + zero-shot", "pi")
    plain = {"variant": "rope-ftx+pi", "rope_scaling": "none", "fine_tuned": False, "train_scaling": "none"}
    assert (kind(plain), method(plain)) == ("zero-shot", "none")
    assert not is_extension({"results": [plain]}) and is_extension({"results": [plain, ft]})


def test_tables_hold_mean_and_std_over_seeds_with_the_best_in_bold(results):
    assert is_extension(results)
    md = extension_markdown(results)
    for protocol in PROTOCOLS:
        cells = table(md, protocol)
        assert list(cells) == ["rope", "rope+pi", "rope+ntk", "rope+yarn", "rope-ft", "rope+pi-ft", "rope+ntk-ft",
                               "rope+yarn-ft", "rope-ft+pi", "rope-ft+yarn"]  # fmt: skip
        for i in range(len(LENGTHS)):
            means = {v: expected(v, protocol, i)[0] for v in VARIANTS}
            best = min(means.values())  # ties (rope-ft and rope-ft+<method> up to 4 L) are all bold
            for v in VARIANTS:
                text = expected(v, protocol, i)[1]
                assert cells[v][i] == (f"**{text}**" if means[v] == best else text), (protocol, v, LENGTHS[i])
        assert sum("**" in c for c in cells["rope+yarn-ft"]) == 3  # the best at every length beyond 4 L
    header = md.split("\n## nonoverlapping (perplexity per token)\n")[1].split("\n")[1]
    assert header == ("| variant | kind | 128 (1 L) | 256 (2 L) | 512 (4 L) | 1,024 (8 L) | 2,048 (16 L) | "
                      "4,096 (32 L) |")
    assert "| rope+pi-ft | fine-tuned |" in md and "| rope-ft+yarn | fine-tuned + zero-shot |" in md


def geo_best(protocol: str, idx: list[int], names) -> tuple[str, float]:
    scores = {v: math.exp(np.mean([math.log(expected(v, protocol, i)[0]) for i in idx])) for v in names}
    v = min(scores, key=scores.get)
    return v, scores[v]


def test_winner_table(results):
    md = extension_markdown(results)
    assert "| protocol | ≤ 4 L: best | ≤ 4 L: best zero-shot | beyond 4 L: best | beyond 4 L: best zero-shot |" in md
    zero_shot = ["rope", "rope+pi", "rope+ntk", "rope+yarn"]
    for protocol in PROTOCOLS:
        row = next(x for x in md.splitlines() if x.startswith(f"| {protocol} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        want = []
        for idx in ([0, 1, 2], [3, 4, 5]):
            for names in (VARIANTS, zero_shot):
                v, score = geo_best(protocol, idx, names)
                want.append(f"{v} ({score:.1f})")
        assert cells == want
    nono = next(x for x in md.splitlines() if x.startswith("| nonoverlapping |"))
    assert "rope+yarn-ft" in nono.split("|")[4] and "rope+yarn (" in nono.split("|")[5]


def test_write_report_writes_the_extension_report_and_plot(results, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    (tmp_path / "study.json").write_text(json.dumps({"command": "python scripts/run_study.py --preset extension",
                                                     "commit": "abc", "preset": "extension"}))  # fmt: skip
    report = write_report(tmp_path)
    text = report.read_text()
    assert text.startswith("# RoPE context extension: zero-shot against fine-tuned at 4 L")
    assert "| preset | extension |" in text and "![" in text and "(extension_ppl.png)" in text
    for protocol in PROTOCOLS:
        assert f"\n## {protocol} (perplexity per token)\n" in text
    assert "Beside the ALiBi paper" not in text and "ratio" not in text.split("## Winners")[1]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["extension_ppl.png", "report.md",
                                                                     "results.json"]  # fmt: skip
    assert (tmp_path / "eval" / "extension_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_styles_and_means(results):
    fig = extension_figure(results)
    ax = next(a for a in fig.axes if a.get_title() == "sliding")
    lines = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
    assert lines["rope+pi"].get_linestyle() == "--" and lines["rope+pi-ft"].get_linestyle() == "-"
    assert lines["rope-ft+pi"].get_linestyle() == "-."
    assert lines["rope+pi"].get_color() == lines["rope+pi-ft"].get_color()  # a colour per method
    np.testing.assert_allclose(lines["rope+ntk-ft"].get_ydata(), [expected("rope+ntk-ft", "sliding", i)[0]
                                                                  for i in range(len(LENGTHS))])  # fmt: skip
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2 and ax.get_yscale() == "log"
    assert any(list(ln.get_xdata()) == [FT_LEN] * 2 for ln in ax.get_lines())  # the line at 4 L
