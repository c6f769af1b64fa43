"""Results as data (issue 22): a checkpoint's identity as fields (eval_run.identity), the display name made once from
them, reports that read the fields and still read files written before them, and a task checkpoint's evaluation:
its rows, its lines on the terminal and its wandb rows by length bin."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_config, wandb_runs
from test_study_baselines import checkpoint

from roformer.eval_run import EvalConfig, identity, run_evaluation, variant_name
from roformer.evaluation import EvalSettings
from roformer.extension_report import extension_markdown
from roformer.logger import EVAL_TASK_STEP, LoggerConfig, task_history, task_summary
from roformer.positional import PosConfig, RopeScaling
from roformer.probe_report import sections_markdown, sections_terminal
from roformer.reporting import add_ratios, markdown, scored_line, terminal_summary
from roformer.result_rows import variant_family
from roformer.study_report import study_markdown
from roformer.training import train

# checkpoint config -> (variant, family, the fields that set it apart from plain RoPE)
CASES = [
    (checkpoint(PosConfig()), "rope", "rope", {}),
    (checkpoint(PosConfig(), attention="linear"), "rope+linear", "rope+linear", {"attention": "linear"}),
    (checkpoint(PosConfig(name="learned", max_len=4096)), "learned-32L", "learned",
     {"scheme": "learned", "table_multiple": 32.0}),
    (checkpoint(PosConfig(name="learned", max_len=128)), "learned", "learned",
     {"scheme": "learned", "table_multiple": 1.0}),
    (checkpoint(PosConfig(name="sinusoidal", scale_embeddings=True)), "sinusoidal-fairseq", "sinusoidal",
     {"scheme": "sinusoidal", "scale_embeddings": True}),
    (checkpoint(PosConfig(name="learned", max_len=2048, randomized_max=2048)), "learned-16L+rand", "learned+rand",
     {"scheme": "learned", "table_multiple": 16.0, "randomized": True}),
    (checkpoint(PosConfig(base=500000.0)), "rope+base500000", "rope+base500000", {"rope_base": 500000.0}),
    (checkpoint(PosConfig(), seq_len=512, init_from="runs/a"), "rope-ft", "rope",
     {"init_from": "runs/a", "fine_tuned": True, "ft_method": "none"}),
    (checkpoint(PosConfig(scaling="yarn", scaling_factor=4, original_len=128), seq_len=512, init_from="a.pt"),
     "rope+yarn-ft", "rope+yarn-ft",
     {"train_scaling": "yarn", "init_from": "a.pt", "fine_tuned": True, "ft_method": "yarn"}),
    (checkpoint(PosConfig(base=500000.0), seq_len=512, init_from="a.pt"), "rope+abf-ft", "rope+abf-ft",
     {"rope_base": 500000.0, "init_from": "a.pt", "fine_tuned": True, "ft_method": "abf"}),
]  # fmt: skip
PLAIN = {"scheme": "rope", "attention": "softmax", "table_multiple": None, "scale_embeddings": False,
         "randomized": False, "rope_base": None, "train_scaling": "none", "init_from": None, "fine_tuned": False,
         "ft_method": None, "seed": None}  # fmt: skip


@pytest.mark.parametrize("ck, variant, family, fields", CASES)
def test_identity_fields_and_the_names_made_from_them(ck, variant, family, fields):
    train_len = ck["train_cfg"]["trainer"]["seq_len"]
    got = identity(ck, train_len).fields()
    assert got == {"variant": variant, "family": family, **PLAIN, **fields}
    assert variant_name(ck, train_len) == variant
    # the old parser agrees with the field on every name it can parse, with or without a zero-shot scaling
    for scaling in (RopeScaling.none, RopeScaling.yarn):
        for bca in (False, True):
            row = identity(ck, train_len).row(scaling, bca)
            assert row["family"] == variant_family(row["variant"]), row["variant"]


def test_a_row_scored_with_a_zero_shot_scaling():
    ck = checkpoint(PosConfig(), seq_len=512, init_from="runs/a")
    row = identity(ck, 512).row(RopeScaling.yarn, bca=True)
    assert {k: row[k] for k in ("variant", "family", "base_variant", "rope_scaling", "bca", "fine_tuned")} == {
        "variant": "rope-ft+yarn+bca", "family": "rope+yarn+bca", "base_variant": "rope-ft+bca", "rope_scaling": "yarn",
        "bca": True, "fine_tuned": True}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Reports read the fields, and files written before them the same way

NEW_KEYS = {"family", "attention", "table_multiple", "scale_embeddings", "randomized", "rope_base", "train_scaling",
            "init_from", "fine_tuned", "ft_method", "base_variant", "bca", "kind"}  # fmt: skip


def fake_results(cases: list[tuple[dict, int, dict[RopeScaling, float]]]) -> dict:
    """results.json as evaluate.py writes it now, for checkpoints (config, train_len, zero-shot scaling -> growth) x
    two seeds x two protocols x lengths 1, 2 and 4 train_len; perplexity grows as the length to the power growth."""
    rows, probes, ckpts = [], [], []
    for i, (ck, train_len, scalings) in enumerate(cases):
        ident = identity(ck, train_len)
        for seed in (0, 1):
            label = f"c{i},seed={seed}"
            ckpts.append({"label": label, **ident.fields(), "seed": seed, "train_len": train_len,
                          "tokens_seen": 1000, "config": {"model": {}}})
            for sc, growth in scalings.items():
                ids = {"label": label, **ident.row(sc), "seed": seed, "train_len": train_len}
                for protocol in ("nonoverlapping", "sliding"):
                    for m in (1, 2, 4):
                        ppl = (50 + 7 * i + seed) * m ** (growth * (1 + seed / 10))
                        rows.append({**ids, "kind": "perplexity", "protocol": protocol, "length": m * train_len,
                                     "status": "ok", "note": "", "ppl": ppl, "tokens": 512, "words": 400,
                                     "bytes": 2000, "bits_per_byte": 1.0, "word_ppl": ppl * 1.5, "nll_sum": 1.0})
                probes.append({**ids, "kind": "probe", "probe": "passkey", "metric": "key_top1", "value": 0.5 + i / 20,
                               "n": 3, "length": 2 * train_len, "distance": None, "depth": 0.5, "status": "ok",
                               "note": "", "chance": 0.1})
    add_ratios(rows)
    return {"settings": {"split": "test", "probe_seed": 0, "probe_trials": 3}, "checkpoints": ckpts, "results": rows,
            "per_position": [], "probes": probes, "tasks": []}


def without_fields(results: dict) -> dict:
    """The same results as a file written before the rows had identity fields."""
    strip = lambda rows: [{k: v for k, v in r.items() if k not in NEW_KEYS} for r in rows]  # noqa: E731
    return {**results, "results": strip(results["results"]), "probes": strip(results["probes"])}


NONE, PI, YARN = RopeScaling.none, RopeScaling.pi, RopeScaling.yarn
STUDY = [(checkpoint(PosConfig()), 128, {NONE: 0.2, YARN: 0.15}),
         (checkpoint(PosConfig(name="learned", max_len=4096)), 128, {NONE: 0.05}),
         (checkpoint(PosConfig(name="learned", max_len=128)), 128, {NONE: 0.5}),
         (checkpoint(PosConfig(name="sinusoidal", scale_embeddings=True)), 128, {NONE: 0.1}),
         (checkpoint(PosConfig(name="sinusoidal")), 128, {NONE: 0.4})]  # fmt: skip
EXTENSION = [(checkpoint(PosConfig()), 128, {NONE: 0.3, PI: 0.1}),
             (checkpoint(PosConfig(), seq_len=512, init_from="a.pt"), 512, {NONE: 0.3, YARN: 0.1}),
             (checkpoint(PosConfig(scaling="pi", scaling_factor=4, original_len=128), seq_len=512, init_from="a.pt"),
              512, {NONE: 0.1}),
             (checkpoint(PosConfig(base=500000.0), seq_len=512, init_from="a.pt"), 512, {NONE: 0.2})]  # fmt: skip


def test_old_result_files_make_the_same_reports():
    study, ext = fake_results(STUDY), fake_results(EXTENSION)
    old_study, old_ext = without_fields(study), without_fields(ext)
    assert "family" not in old_study["results"][0] and "kind" not in old_study["probes"][0]
    md = study_markdown(study)
    assert md == study_markdown(old_study)
    headline = md.split("## Perplexity ratio to L, nonoverlapping")[1].split("\n## ")[0]
    names = [x.split("|")[1].strip() for x in headline.splitlines() if x.startswith("| ")][1:]
    # by the ratio at 4 L, a sibling beside the best of its family (alone, learned would sort last)
    assert names == ["learned-32L", "learned", "sinusoidal-fairseq", "sinusoidal", "rope+yarn", "rope"]
    assert markdown(study) == markdown(old_study) and terminal_summary(study) == terminal_summary(old_study)
    assert sections_markdown(study) == sections_markdown(old_study) and "| rope+yarn | mean |" in markdown(study)
    text = extension_markdown(ext)
    assert text == extension_markdown(old_ext)
    for variant, kind in (("rope-ft", "fine-tuned"), ("rope+pi-ft", "fine-tuned"), ("rope+abf-ft", "fine-tuned"),
                          ("rope-ft+yarn", "fine-tuned + zero-shot"), ("rope+pi", "zero-shot")):
        assert f"| {variant} | {kind} |" in text, variant


# ----------------------------------------------------------------------------------------------------------
# A task checkpoint's evaluation


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("parity") / "run"
    train(tiny_config("data=task", "data.task=parity", "data.task_max_len=4", "data.task_train_size=500",
                      "data.task_val_size=20", "trainer.max_steps=2", "trainer.eval_interval=2"), run)
    return run


@pytest.mark.usefixtures("one_thread")
def test_a_task_checkpoint_alone_rows_lines_and_wandb(parity_run, tmp_path, caplog):
    cfg = EvalConfig(ckpt=str(parity_run), logger=LoggerConfig(mode="offline", job_type="eval"),
                     eval=EvalSettings(device="cpu", progress=False, task_examples=8))
    with caplog.at_level(logging.INFO, logger="roformer.eval_run"):
        res = run_evaluation(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "roformer.eval_run"]
    assert lines[0] == ("scoring 1 task checkpoint (parity): exact match of greedy decoding on 8 examples per length "
                        "bin (eval.task_examples)")
    assert not any(x.startswith(("scoring 0", "that is")) for x in lines)  # no empty perplexity grid
    tasks = res["tasks"]
    assert [(r["bin_lo"], r["bin_hi"], r["length"]) for r in tasks] == [(1, 4, 4), (5, 8, 8), (9, 12, 12),
                                                                        (13, 16, 16)]  # fmt: skip
    assert all({k: r[k] for k in ("kind", "scheme", "family", "rope_scaling", "fine_tuned", "init_from", "seed")}
               == {"kind": "task", "scheme": "rope", "family": "rope", "rope_scaling": "none", "fine_tuned": False,
                   "init_from": None, "seed": 0} for r in tasks)  # fmt: skip
    text = terminal_summary(res)
    assert "no perplexity cells" not in text and text == sections_terminal(res)[0]
    assert scored_line(res) == "1 task checkpoint scored (4 length bins)"
    # wandb: a row per bin on the task's own axis, a summary key per bin, the rows as a table
    want = [{EVAL_TASK_STEP: r["bin_hi"], "eval/task_length_multiple": r["bin_hi"] / 4,
             "eval/task/parity/exact_match": r["value"]} for r in tasks]
    assert task_history(tasks) == want
    assert task_summary(tasks) == {f"eval/parity_exact_match@{r['bin_hi']}": r["value"] for r in tasks}
    (run,) = wandb_runs(tmp_path)
    assert run.exit_code == 0 and run.get("checkpoint.family") == "rope" and run.get("checkpoint.task") == "parity"
    assert run.metrics["eval/task/*"] == EVAL_TASK_STEP and run.metrics[EVAL_TASK_STEP] == ""
    assert [h for h in run.history if EVAL_TASK_STEP in h] == want
    (table,) = [h for h in run.history if "eval/tasks/nrows" in h]  # a table's record: its type, size, shape
    assert (table["eval/tasks/_type"], table["eval/tasks/nrows"], table["eval/tasks/ncols"]) == ("table-file", 4, 10)
    assert not any(k.startswith("eval/results") for h in run.history for k in h)  # no perplexity table


def test_task_history_leaves_out_bins_past_a_table_and_sorts_by_length():
    rows = [{"task": "copy", "metric": "exact_match", "bin_lo": lo, "bin_hi": hi, "length": hi, "value": v,
             "train_len": 4} for lo, hi, v in ((5, 8, 0.25), (1, 4, 1.0), (9, 12, None))]  # fmt: skip
    assert task_history(rows) == [
        {EVAL_TASK_STEP: 4, "eval/task_length_multiple": 1.0, "eval/task/copy/exact_match": 1.0},
        {EVAL_TASK_STEP: 8, "eval/task_length_multiple": 2.0, "eval/task/copy/exact_match": 0.25}]
    assert task_summary(rows) == {"eval/copy_exact_match@4": 1.0, "eval/copy_exact_match@8": 0.25}
    old = [{k: v for k, v in r.items() if k != "length"} for r in rows]  # a file from before rows had a length
    assert task_history(old) == task_history(rows)
