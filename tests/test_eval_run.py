"""evaluate.py's work on a real tiny checkpoint: reusing the training token cache (and the fallback that tokenizes
with the checkpoint's tokenizer gives the same scores), the plan line, fixed_target below eval.target_tokens."""

import logging
import os
from dataclasses import replace

import pytest
from conftest import tiny_config, word_corpus

from roformer.data import DataConfig, open_prepared, prepare
from roformer.eval_run import EvalConfig, describe, plan, run_evaluation, share_of
from roformer.evaluation import EvalSettings
from roformer.logger import LoggerConfig
from roformer.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A RoPE model trained at 32 tokens (below eval.target_tokens=256) on a text_files corpus cached under
    cache/, and the data config it was trained with."""
    root = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_config("pos=rope", "trainer.max_steps=4", "trainer.eval_interval=4",
                      *word_corpus(root, {"train": 30, "test": 6}, 700))
    train(cfg, root / "run")
    return root, cfg.data


def eval_config(ckpt, data=None, **settings) -> EvalConfig:
    return EvalConfig(ckpt=str(ckpt), eval=EvalSettings(device="cpu", progress=False, **settings), data=data,
                      logger=LoggerConfig(kind="none", job_type="eval"))


def scores(results: dict) -> dict:
    return {(r["protocol"], r["length"]): (r["status"], r.get("nll_sum"), r.get("tokens"), r.get("bytes"),
                                           r.get("words")) for r in results["results"]}  # fmt: skip


def test_evaluation_reuses_the_training_cache_and_matches_the_fallback(trained, tmp_path, caplog):
    root, data_cfg = trained
    cache = root / "cache"
    before = sorted(os.listdir(cache / "text_files"))
    assert len(before) == 1  # the cache training built
    with caplog.at_level(logging.INFO, logger="roformer"):
        reused = run_evaluation(eval_config(root / "run", lengths=[32, 64]), tmp_path / "reused")
    assert sorted(os.listdir(cache / "text_files")) == before  # no second cache folder
    assert not (cache / "tokenizers").exists()  # and no tokenizer file written for one
    assert f"using the text_files token cache at {cache / 'text_files' / before[0]}" in caplog.text

    # the fallback: no training cache where the data config points, so the split is tokenized with the
    # checkpoint's tokenizer into a cache keyed on it; the tokens, and so every score, are the same
    other = replace(data_cfg, cache_dir=str(tmp_path / "other"))
    assert open_prepared(other) is None and not (tmp_path / "other").exists()  # finding builds nothing
    fallback = run_evaluation(eval_config(root / "run", data=other, lengths=[32, 64]), tmp_path / "fallback")
    assert len(os.listdir(tmp_path / "other" / "text_files")) == 1 and (tmp_path / "other" / "tokenizers").is_dir()
    assert scores(fallback) == scores(reused)
    assert all(r["status"] == "ok" for r in reused["results"])


def test_open_prepared_finds_what_prepare_uses_and_nothing_else(trained, tmp_path):
    root, data_cfg = trained
    tree = sorted((p, p.stat().st_mtime_ns) for p in (root / "cache").rglob("*"))
    found = open_prepared(data_cfg)
    assert open_prepared(replace(data_cfg, vocab_size=301)) is None  # another key: not built, so not found
    assert open_prepared(replace(data_cfg, tokenizer_path=str(tmp_path / "gone.json"))) is None
    assert sorted((p, p.stat().st_mtime_ns) for p in (root / "cache").rglob("*")) == tree  # nothing written
    assert found is not None and found.cache_path == prepare(data_cfg, progress=False).cache_path


def test_defaults_plan_line_and_fixed_target_below_target_tokens(trained, tmp_path, caplog):
    """With default settings (lengths 32 x 1..16, target_tokens 256 > 32) every cell is scored; fixed_target
    scores the last 32 tokens of the same documents at every length and says so."""
    root, _ = trained
    with caplog.at_level(logging.INFO, logger="roformer.eval_run"):
        res = run_evaluation(eval_config(root / "run"), tmp_path / "out")
    n_test = len(open_prepared(trained[1]).splits["test"])
    lines = [r.getMessage() for r in caplog.records if r.name == "roformer.eval_run"]
    assert (f"scoring 1 checkpoint x 7 lengths x 3 protocols = 21 cells; per cell: {n_test - 1:,} tokens "
            "(nonoverlapping, sliding) and the last 32 tokens of 6 documents (fixed_target)") in lines
    assert "that is all of the test split" in lines
    assert [r["status"] for r in res["results"]] == ["ok"] * 21
    fixed = [r for r in res["results"] if r["protocol"] == "fixed_target"]
    assert [r["length"] for r in fixed] == [32, 40, 48, 64, 128, 256, 512]
    assert {r["target_tokens"] for r in fixed} == {32} and {r["tokens"] for r in fixed} == {32 * 6}
    assert {r["bytes"] for r in fixed} == {fixed[0]["bytes"]}  # the same targets at every length
    assert {r["words"] for r in fixed} == {fixed[0]["words"]}
    assert "the last 32 tokens of each of 6 documents, the same at every length" in (
        tmp_path / "out" / "results.md").read_text()


def test_plan_line_says_what_is_capped_and_how_to_score_everything(trained):
    root, data_cfg = trained
    cfg = eval_config(root / "run", max_tokens=1000, max_docs=2)
    plans = plan(cfg)
    data = open_prepared(data_cfg)
    shares = [share_of(pl, data_cfg, data, data.splits["test"], cfg.eval) for pl in plans]
    n_test = len(data.splits["test"])
    first, second = describe(plans, shares, cfg.eval).splitlines()
    assert first == ("scoring 1 checkpoint x 7 lengths x 3 protocols = 21 cells; per cell: 1,000 tokens "
                     "(nonoverlapping, sliding) and the last 32 tokens of 2 documents (fixed_target)")
    assert second == (f"that is part of the test split: 1,000 of its {n_test - 1:,} tokens (eval.max_tokens) and 2 of "
                      "its 6 documents long enough for the largest length (eval.max_docs); to score all of it: "
                      "eval.max_tokens=0 eval.max_docs=0")
    # the bar's total: input tokens read by every cell, a sliding cell about twice a nonoverlapping one
    costs = shares[0].costs
    assert costs[("nonoverlapping", 32)] == 1000 and costs[("fixed_target", 512)] == 2 * 512
    assert 1900 < costs[("sliding", 64)] < 2100


def test_bad_data_config_for_the_fallback_is_not_found(tmp_path):
    """A corpus whose files are gone has no cache to find (the fallback then reports it)."""
    cfg = DataConfig(name="text_files", train_files=[str(tmp_path / "missing.txt")], cache_dir=str(tmp_path))
    assert open_prepared(cfg) is None
    assert list(tmp_path.iterdir()) == []
