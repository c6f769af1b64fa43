"""The study report: ratio statistics over seeds, the literature table, fixed-target beside nonoverlapping."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from roformer.reporting import add_ratios
from roformer.study_report import nearest, paper_ratio, ratio_stats, study_markdown, write_report

L = 64
MULTS = (1, 2, 4, 16)
# (variant, seed) -> ppl at each multiplier; fixed-target uses twice the growth
PPL = {
    ("rope", 0): (100.0, 101.0, 104.0, 120.0),
    ("rope", 1): (110.0, 112.2, 115.5, 121.0),
    ("alibi", 0): (90.0, 89.1, 88.2, 87.3),
    ("alibi", 1): (92.0, 91.08, 90.16, 89.24),
    ("rope+ntk", 0): (100.0, 100.5, 102.0, 110.0),
    ("rope+ntk", 1): (110.0, 110.0, 111.1, 115.5),
}


def word_ppl(ppl: float) -> float:
    """A word perplexity for a token one: 1024 tokens spell 800 words, so its log is 1.28 times the token one's;
    times a made-up factor that grows with ppl, so a word ratio is not the token ratio to any fixed power."""
    return ppl ** (1024 / 800) * (1 + ppl / 1000)


def fake_results() -> dict:
    rows = []
    for (variant, seed), ppls in PPL.items():
        scheme, scaling = (variant.split("+") + ["none"])[:2]
        for protocol, growth in (("nonoverlapping", 1.0), ("fixed_target", 2.0)):
            for m, p in zip(MULTS, ppls, strict=True):
                ppl = ppls[0] * (p / ppls[0]) ** growth
                rows.append(dict(label=f"pos={scheme},seed={seed}", variant=variant, scheme=scheme,
                                 rope_scaling=scaling, seed=seed, train_len=L, protocol=protocol, length=m * L,
                                 status="ok", note="", ppl=ppl, tokens=1024, words=800,
                                 word_ppl=word_ppl(ppl)))
    for seed in (0, 1):  # learned: scored at L only
        for protocol in ("nonoverlapping", "fixed_target"):
            for m in MULTS:
                ok = m == 1
                rows.append(dict(label=f"pos=learned,seed={seed}", variant="learned", scheme="learned",
                                 rope_scaling="none", seed=seed, train_len=L, protocol=protocol, length=m * L,
                                 status="ok" if ok else "n/a", note="" if ok else "n/a (table size 64)",
                                 ppl=120.0 + seed if ok else None, tokens=1024, words=800,
                                 word_ppl=word_ppl(120.0 + seed) if ok else None))
    add_ratios(rows)
    model = {"n_layer": 2, "d_model": 32, "n_head": 2}
    ckpts = [dict(label=f"pos={s},seed={seed}", seed=seed, train_len=L, tokens_seen=4096, config={"model": model})
             for s in ("rope", "alibi", "learned") for seed in (0, 1)]
    return {"settings": {"split": "test"}, "checkpoints": ckpts, "results": rows, "per_position": []}


def test_ratio_stats_are_per_seed_ratios_then_mean_and_std():
    stats = ratio_stats(fake_results()["results"], "nonoverlapping")
    a = stats[("rope", 16.0)]
    r = [120.0 / 100.0, 121.0 / 110.0]
    assert a["n"] == 2 and a["ratios"] == pytest.approx(r)
    assert a["mean"] == pytest.approx(sum(r) / 2)
    assert a["std"] == pytest.approx(abs(r[0] - r[1]) / math.sqrt(2))  # sample std of two values
    assert stats[("rope", 1.0)]["mean"] == 1.0 and stats[("rope", 1.0)]["std"] == 0.0
    assert stats[("learned", 4.0)] == {"status": "n/a", "note": "n/a (table size 64)", "n": 0}
    fixed = ratio_stats(fake_results()["results"], "fixed_target")
    assert fixed[("rope", 16.0)]["ratios"] == pytest.approx([x**2 for x in r])


def test_cells_without_a_ratio_are_marked_not_crashed():
    results = fake_results()
    for r in results["results"]:  # fixed-target: rope's text too short at 16 L, alibi's missing at L
        if r["protocol"] == "fixed_target" and r["variant"] == "rope" and r["length"] == 16 * L:
            r.update(status="skipped", note="too short", ppl=None)
        if r["protocol"] == "fixed_target" and r["variant"] == "alibi" and r["length"] == L:
            r.update(status="skipped", note="too short", ppl=None)
    add_ratios(results["results"])
    fixed = ratio_stats(results["results"], "fixed_target")
    assert fixed[("rope", 16.0)] == {"status": "skipped", "note": "too short", "n": 0}
    assert fixed[("alibi", 2.0)] == {"status": "no ratio", "note": "", "n": 0}
    section = study_markdown(results).split("## Fixed-target against nonoverlapping")[1].split("##")[0]
    assert next(x for x in section.splitlines() if x.startswith("| rope |")).endswith("| n/a |")
    assert next(x for x in section.splitlines() if x.startswith("| alibi |")) == "| alibi | n/a | n/a | n/a |"


def test_nearest_multiplier_on_a_log_scale():
    assert nearest([1.25, 2, 4, 16], 5) == 4
    assert nearest([1.25, 2, 4, 16], 24) == 16
    assert nearest([2, 5, 8, 24], 5) == 5
    assert nearest([1.5, 3], 2) == 1.5  # |log(0.75)| < |log(1.5)|


def paper_section(md: str) -> list[str]:
    return md.split("## Beside the ALiBi paper")[1].split("\n## ")[0].splitlines()


def test_markdown_sets_ours_beside_the_paper_in_word_level_ratios():
    results = fake_results()
    lines = paper_section(study_markdown(results))
    assert "| variant | 2 L / ~2 L | 4 L / ~5 L | 16 L / ~24 L |" in lines
    rope = next(x for x in lines if x.startswith("| rope |"))
    # ours: word ppl at 16 L / word ppl at L per seed, then mean and std, computed here from the rows
    by_seed = {(r["seed"], r["length"]): r["word_ppl"] for r in results["results"]
               if r["variant"] == "rope" and r["protocol"] == "nonoverlapping"}  # fmt: skip
    w = [by_seed[(s, 16 * L)] / by_seed[(s, L)] for s in (0, 1)]
    t = [120.0 / 100.0, 121.0 / 110.0]  # the per-token ratios, which must not be what the cell shows
    assert rope.endswith(f"| {np.mean(w):.3f} ± {np.std(w, ddof=1):.3f} / 3.5 |")
    assert f"{np.mean(t):.3f}" not in rope and f"{np.mean(t):.2f}" not in rope
    assert f"| {np.mean(w):.3f}" in rope and abs(np.mean(w) - np.mean(t)) > 0.01
    # the paper's rotary ratio at ~2 L is computed from its perplexities, 21.37 / 20.07
    assert "/ 1.065 |" in rope and paper_ratio("rope", 2) == pytest.approx(21.37 / 20.07)
    assert "(not run) / 2.2 |" in next(x for x in lines if x.startswith("| sinusoidal |"))
    assert "(not run) / 2.2 |" in next(x for x in lines if x.startswith("| sinusoidal-fairseq |"))
    assert "word-level" in "\n".join(lines) and "1.28 tokens per word" in "\n".join(lines)


def test_markdown_paper_scale_from_the_tokens_seen():
    results = fake_results()
    for c in results["checkpoints"]:
        c["tokens_seen"] = 1_024_000
    text = "\n".join(paper_section(study_markdown(results)))
    assert "205 epochs of WikiText-103, about 2.1×10^10 tokens: some 21,000× the 1,024,000 tokens" in text
    assert "100×" not in text and "100x" not in text


def test_markdown_headline_is_per_token_and_sorted():
    md = study_markdown(fake_results())
    lines = md.splitlines()
    assert "## Perplexity ratio to L, nonoverlapping (per token)" in lines
    s = ratio_stats(fake_results()["results"], "nonoverlapping")[("rope", 16.0)]
    rope = next(x for x in lines if x.startswith("| rope |"))  # the headline's row comes first
    assert rope.endswith(f"| {s['mean']:.2f} ± {s['std']:.2f} |")
    # the headline table: sorted by the ratio at the longest length, n/a last
    headline = md.split("## Perplexity ratio to L, nonoverlapping")[1].split("##")[0].splitlines()
    assert [x.split("|")[1].strip() for x in headline if x.startswith("| ")][1:] == ["alibi", "rope+ntk", "rope",
                                                                                  "learned"]
    assert "n/a | n/a | n/a" in next(x for x in lines if x.startswith("| learned |"))


def with_new_variants(results: dict) -> dict:
    """learned-32L (a table of 32 L: numbers beyond L) and sinusoidal-fairseq, two seeds each."""
    rows = results["results"]
    for variant, growth in (("learned-32L", 3.0), ("sinusoidal-fairseq", 2.0)):
        scheme = variant.split("-")[0]
        for seed in (0, 1):
            for protocol in ("nonoverlapping", "fixed_target"):
                for m in MULTS:
                    ppl = (130.0 + seed) * m ** (growth / 10)
                    rows.append(dict(label=f"pos={scheme},x,seed={seed}", variant=variant, scheme=scheme,
                                     rope_scaling="none", seed=seed, train_len=L, protocol=protocol, length=m * L,
                                     status="ok", note="", ppl=ppl, tokens=1024, words=800, word_ppl=word_ppl(ppl)))
    add_ratios(rows)
    return results


def test_new_variants_stand_beside_their_family():
    results = with_new_variants(fake_results())
    md = study_markdown(results)
    headline = md.split("## Perplexity ratio to L, nonoverlapping")[1].split("\n## ")[0].splitlines()
    names = [x.split("|")[1].strip() for x in headline if x.startswith("| ")][1:]
    assert names.index("learned") == names.index("learned-32L") + 1  # beside it, where learned-32L sorts
    learned32 = next(x for x in headline if x.startswith("| learned-32L |"))
    assert "n/a" not in learned32
    fixed = md.split("## Fixed-target against nonoverlapping")[1].split("\n## ")[0]
    assert "| sinusoidal-fairseq |" in fixed and "| learned-32L |" in fixed
    paper = paper_section(md)
    w = ratio_stats(results["results"], "nonoverlapping", field="word_ppl")[("sinusoidal-fairseq", 16.0)]
    row = next(x for x in paper if x.startswith("| sinusoidal-fairseq |"))
    assert row.endswith(f"| {w['mean']:.3f} ± {w['std']:.3f} / 18.6 |")
    assert not any(x.startswith("| learned") for x in paper)  # the paper has no learned-32L counterpart


def test_markdown_fixed_target_beside_nonoverlapping():
    md = study_markdown(fake_results())
    section = md.split("## Fixed-target against nonoverlapping")[1].split("##")[0]
    rope = next(x for x in section.splitlines() if x.startswith("| rope |"))
    f = ratio_stats(fake_results()["results"], "fixed_target")[("rope", 16.0)]["mean"]
    n = ratio_stats(fake_results()["results"], "nonoverlapping")[("rope", 16.0)]["mean"]
    assert rope.endswith(f"| {f:.2f}× / {n:.2f}× |")
    assert "rope+ntk" not in section  # scaling variants only in the headline table
    assert "1,024 target tokens" in section


def test_write_report_with_the_study_record(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(fake_results()))
    study = {"command": "python scripts/run_study.py", "commit": "abc123", "machine": "test box", "preset": "cpu",
             "wall_seconds": 3000.0, "train_seconds": 2400.0, "eval_seconds": 600.0,
             "runs": [{"run": "pos=rope,seed=0", "exit_code": 0}], "eval_exit_code": 0}
    (tmp_path / "study.json").write_text(json.dumps(study))
    report = write_report(tmp_path)
    text = report.read_text()
    assert report == tmp_path / "eval" / "report.md"
    assert "| wall time | 50.0 min (training 40.0 min, evaluation 10.0 min) |" in text
    assert "`abc123`" in text and "Failures" not in text
    # the published ratio plot, embedded in the report; no temp files
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["ppl_ratio.png", "report.md", "results.json"]
    assert "![perplexity per token relative to L, nonoverlapping](ppl_ratio.png)" in text
    assert "(ppl_vs_length.png)" not in text  # not written here (evaluate.py writes it): not embedded


def test_write_report_without_results_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json not found: run scripts/run_study.py"):
        write_report(tmp_path)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_run_study_end_to_end_and_continues(tmp_path):
    """scripts/run_study.py on a toy corpus: 2 variants x 2 seeds, evaluation, report; a rerun trains nothing."""
    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "tree", "cloud"]
    for split, n_docs in (("train", 30), ("test", 4)):
        docs = [" ".join(rng.choice(words, 300)) + "." for _ in range(n_docs)]
        (tmp_path / f"{split}.txt").write_text("\n\n".join(docs))
    study = tmp_path / "study"
    cmd = [sys.executable, str(root / "scripts" / "run_study.py"), "--preset", "quick", "--out", str(study),
           "--variants", "rope,alibi", "--seeds", "0,1", "--logger", "none", "--",
           "data=text_files", f"data.train_files=[{tmp_path / 'train.txt'}]",
           f"data.test_files=[{tmp_path / 'test.txt'}]", "data.txt_sample_by=paragraph",
           f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300", "model.d_model=32", "model.n_layer=1",
           "trainer.seq_len=16", "trainer.batch_size=4", "trainer.max_steps=3",
           "trainer.eval_interval=0", "trainer.eval_iters=2"]  # fmt: skip
    env_cmd = dict(capture_output=True, text=True, timeout=600)
    r = subprocess.run(cmd, **env_cmd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((study / "study.json").read_text())
    assert [x["run"] for x in record["runs"]] == [
        "pos=rope,seed=0", "pos=alibi,seed=0", "pos=rope,seed=1", "pos=alibi,seed=1"
    ]
    assert all(x["exit_code"] == 0 for x in record["runs"]) and record["eval_exit_code"] == 0
    results = json.loads((study / "eval" / "results.json").read_text())
    assert sorted({(c["scheme"], c["seed"]) for c in results["checkpoints"]}) == [
        ("alibi", 0), ("alibi", 1), ("rope", 0), ("rope", 1)
    ]
    assert {r["rope_scaling"] for r in results["results"] if r["scheme"] == "rope"} == {
        "none", "pi", "ntk", "dynamic_ntk", "yarn"
    }
    report = (study / "eval" / "report.md").read_text()
    stats = ratio_stats(results["results"], "nonoverlapping")
    a = stats[("rope", 16.0)]
    w = ratio_stats(results["results"], "nonoverlapping", field="word_ppl")[("rope", 16.0)]
    assert a["n"] == 2 and f"{w['mean']:.3f} ± {w['std']:.3f} / 3.5 |" in report
    assert "(not run) / 18.6 |" in report  # sinusoidal was not in this study
    assert (study / "eval" / "ppl_ratio.png").is_file() and "![" in report and "(ppl_ratio.png)" in report
    r2 = subprocess.run(cmd, **env_cmd)  # continues: every run already has its last checkpoint
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert r2.stdout.count("already trained") == 4
    assert json.loads((study / "study.json").read_text())["runs"] == []
