"""The task study's report: accuracy per bin over seeds, the mean reciprocal rank, the paper beside ours."""

import json

import pytest

from roformer.study_report import write_report
from roformer.task_report import PAPER_MRR, accuracy_tables, learned_count, mean_reciprocal_rank, scenarios

BINS = [(1, 5), (6, 10), (11, 15), (16, 20)]
# (task, family) -> per seed, the accuracy in each bin
ACC = {
    ("copy", "nope"): [(1.0, 0.8, 0.4, 0.1), (1.0, 0.6, 0.2, 0.1)],
    ("copy", "rope"): [(1.0, 0.5, 0.0, 0.0), (0.9, 0.3, 0.0, 0.0)],
    ("copy", "alibi"): [(0.8, 0.7, 0.3, 0.1), (0.8, 0.7, 0.3, 0.1)],
    ("parity", "nope"): [(1.0, 0.5, 0.5, 0.5)],
    ("parity", "rope"): [(1.0, 0.7, 0.6, 0.5)],
    ("parity", "alibi"): [(0.5, 0.5, 0.5, 0.4)],
}


def rows(acc=ACC, variant=lambda f: f) -> list[dict]:
    out = []
    for (task, fam), seeds in acc.items():
        for seed, values in enumerate(seeds):
            for (lo, hi), v in zip(BINS, values, strict=True):
                out.append({"task": task, "variant": variant(fam), "family": fam, "scheme": fam, "seed": seed,
                            "bin_lo": lo, "bin_hi": hi, "length": hi, "value": v, "n": 200})
    return out


def test_scenarios_are_every_task_and_bin_beyond_the_training_lengths():
    assert scenarios(rows()) == [("copy", b) for b in BINS[1:]] + [("parity", b) for b in BINS[1:]]
    assert scenarios(rows(), up_to=2) == [("copy", (6, 10)), ("parity", (6, 10))]  # up to 2 L, as the paper tests
    assert scenarios(rows(), up_to=3) == [("copy", (6, 10)), ("copy", (11, 15)), ("parity", (6, 10)),
                                          ("parity", (11, 15))]


def test_mrr_ranks_each_scenario_by_the_mean_over_seeds_ties_sharing_the_better_rank():
    # copy 6-10: alibi 0.7 > nope 0.7? nope's mean is 0.7 too: tied first; rope 0.4 third
    # copy 11-15: alibi 0.3 = nope 0.3 first, rope 0 third; copy 16-20: alibi 0.1 = nope 0.1, rope 0 third
    # parity 6-10: rope 0.7 first, nope 0.5 = alibi 0.5 second; 11-15: rope, then nope = alibi; 16-20: rope 0.5 =
    # nope 0.5 first, alibi third
    mrr = mean_reciprocal_rank(rows(), ["nope", "rope", "alibi"])
    assert mrr == pytest.approx({"nope": (1 + 1 + 1 + 0.5 + 0.5 + 1) / 6,
                                 "rope": (1 / 3 + 1 / 3 + 1 / 3 + 1 + 1 + 1) / 6,
                                 "alibi": (1 + 1 + 1 + 0.5 + 0.5 + 1 / 3) / 6})
    # up to 2 L: copy 6-10 (nope = alibi first, rope third) and parity 6-10 (rope first, nope = alibi second)
    assert mean_reciprocal_rank(rows(), ["nope", "rope", "alibi"], up_to=2) == pytest.approx(
        {"nope": (1 + 0.5) / 2, "rope": (1 / 3 + 1) / 2, "alibi": (1 + 0.5) / 2})
    # among two only, the third does not count
    assert mean_reciprocal_rank(rows(), ["rope", "alibi"]) == pytest.approx(
        {"rope": (0.5 + 0.5 + 0.5 + 1 + 1 + 1) / 6, "alibi": (1 + 1 + 1 + 0.5 + 0.5 + 0.5) / 6})


def test_a_bin_a_model_cannot_read_ranks_as_zero_accuracy_and_shows_as_na():
    acc = {("copy", "learned"): [(1.0, None, None, None)], ("copy", "rope"): [(1.0, 0.0, 0.0, 0.0)]}
    rs = rows(acc, variant=lambda f: f + "-16L" if f == "learned" else f)
    assert mean_reciprocal_rank(rs, ["learned", "rope"]) == {"learned": 1.0, "rope": 1.0}  # 0 = 0: tied
    table = "\n".join(accuracy_tables(rs))
    assert "| learned | 1 | 100 | n/a | n/a | n/a |" in table  # grouped by family, not by the -16L variant


def test_tables_give_mean_and_std_in_percent_and_count_who_learned():
    table = "\n".join(accuracy_tables(rows()))
    assert "| rope | 2 | 95 ± 5 | 40 ± 10 | 0 ± 0 | 0 ± 0 |" in table
    assert learned_count(rows(), "copy") == (2, 3)  # nope 1.0, rope 0.95; alibi 0.8
    assert "2 of 3 schemes reach 90% in distribution" in table
    # sorted by the mean accuracy beyond the training lengths: nope (0.367), alibi (0.367), rope (0.133)
    copy = table.split("### parity")[0]
    assert copy.index("| nope |") < copy.index("| rope |") and copy.index("| alibi |") < copy.index("| rope |")


def test_write_report_of_a_task_study(tmp_path):
    (tmp_path / "eval").mkdir()
    ck = {"config": {"model": {"n_layer": 2, "d_model": 128, "n_head": 4}}, "data": {"task_test_max_mult": 4},
          "step": 1000}
    results = {"settings": {"task_examples": 200}, "checkpoints": [ck], "results": [], "probes": [], "tasks": rows()}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path)
    text = report.read_text()
    assert report == tmp_path / "eval" / "report.md" and (tmp_path / "eval" / "task_accuracy.png").stat().st_size
    lines = (tmp_path / "eval" / "task_accuracy.csv").read_text().splitlines()
    assert lines[0] == "task,scheme,bin_lo,bin_hi,seeds,mean,std,per_seed" and len(lines) == 1 + 6 * 4
    assert "copy,rope,1,5,2,0.9500,0.0500,1.0000 0.9000" in lines
    assert "Up to 2 L, as far as the paper tests: 2 (2 tasks); up to the last bin: 6." in text
    assert f"| NoPE (nope) | {PAPER_MRR['nope']:.2f} | 0.75 | 0.83 |" in text
    assert f"| Rotary (rope) | {PAPER_MRR['rope']:.2f} | 0.67 | 0.67 |" in text
    assert "Paper's order: NoPE > ALiBi > Rotary. Ours up to 2 L: NoPE = ALiBi > Rotary." in text


def test_a_recall_only_study_is_not_set_beside_the_paper_and_says_it_trains_at_L(tmp_path):
    acc = {("associative_recall", f): [(v, 0.1, 0.0, 0.0)] for f, v in (("rope", 1.0), ("nope", 0.3))}
    (tmp_path / "eval").mkdir()
    ck = {"config": {"model": {"n_layer": 2, "d_model": 128, "n_head": 4}}, "data": {"task_test_max_mult": 4},
          "step": 3000}
    results = {"settings": {"task_examples": 200}, "checkpoints": [ck], "results": [], "probes": [],
               "tasks": rows(acc)}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "none of this study's tasks is one of theirs" in text and "Paper's order" not in text
    assert "| NoPE (nope) | " not in text and "| rope | 1.00 | 1.00 |" in text  # every scheme's ranking stays
    assert "instance lengths 1..L (associative_recall: exactly L)" in text
    assert "| scheme | seeds | 1–5 (trained at 5) | 6–10 | 11–15 | 16–20 |" in text
    assert "1–5 (train)" in "\n".join(accuracy_tables(rows()))  # tasks trained on 1..L keep the short label
