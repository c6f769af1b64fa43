"""Retrieval probes (roformer/probes.py): the passkey prompt against the template, scorers against oracle and
uniform models with known answers, the KV-cache shortcut against a full forward, seeding, the settings, and
evaluate end to end (rows in results.json, results.md and the terminal summary)."""

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONFIGS, tiny_config, wandb_runs, word_corpus

from roformer.data import tokenizer as toklib
from roformer.eval_run import EvalConfig, run_evaluation
from roformer.evaluation import EvalSettings
from roformer.logger import (
    EVAL_DISTANCE,
    EVAL_STEP,
    LoggerConfig,
    distance_history,
    eval_history,
    log_evaluation,
    probe_summary,
)
from roformer.model import ModelConfig, TransformerLM
from roformer.positional import PosConfig, RopeScaling
from roformer.probes import (
    DISTRACTORS,
    FILLER,
    INTRO,
    QUESTION,
    copy_cells,
    key_line,
    ordinary_ids,
    passkey_cells,
    passkey_prompt,
    passkey_text,
    run_probes,
    score_passkey,
)
from roformer.reporting import markdown, terminal_summary
from roformer.training import train

# the tokenizer sees no digits, so every 5-digit key is the same number of tokens (one per byte)
TOK = toklib.train_bpe([INTRO, " ".join(FILLER * 3), QUESTION, "The pass key is . Remember it. is the pass key."] * 5,
                       400, progress=False)
ENCODE = lambda s: TOK.encode(s, add_special_tokens=False).ids  # noqa: E731
V = TOK.get_vocab_size()
SETTINGS = dict(device="cpu", progress=False)
pytestmark = pytest.mark.usefixtures("one_thread")


def settings(**kw) -> EvalSettings:
    return EvalSettings(**{"probes": ["passkey", "copy"], "probe_trials": 3, **kw})


@pytest.mark.parametrize("target", [140, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_is_the_template_at_the_depth_and_length(target, depth):
    p = passkey_prompt(ENCODE, target, depth, 12345)
    text = TOK.decode(p.ids)
    assert text == passkey_text(p.n_before, p.n_after, 12345)  # what was tokenized, nothing cut inside a sentence
    lines = text.split("\n")
    assert lines[0] == INTRO and lines[2] == key_line(12345) and lines[4] == QUESTION
    assert lines[2] == "The pass key is 12345. Remember it. 12345 is the pass key."
    n = p.n_before + p.n_after
    assert p.n_before == int(depth * n + 0.5)
    for filler_line, count in ((lines[1], p.n_before), (lines[3], p.n_after)):  # the five sentences, in order
        assert filler_line == " ".join(FILLER[i % 5] for i in range(count))
    assert text.count("12345") == 2
    # as long as fits: never above the target, and one more filler sentence would pass it
    sentence = max(len(ENCODE(" " + s)) for s in FILLER)
    assert len(p.ids) <= target < len(p.ids) + sentence + 1
    assert len(ENCODE(passkey_text(p.n_before + 1, p.n_after, 12345))) > target or \
        len(ENCODE(passkey_text(p.n_before, p.n_after + 1, 12345))) > target


def test_passkey_prompt_too_short_for_the_template_is_none():
    need = len(ENCODE(passkey_text(0, 0, 12345)))
    assert passkey_prompt(ENCODE, need - 1, 0.5, 12345) is None
    assert passkey_prompt(ENCODE, need, 0.5, 12345).n_before == 0


class Induction(torch.nn.Module):
    """An oracle for retrieval: at each of the last few positions it predicts the token that followed the longest
    earlier match of the context before it (ties: the earliest), with logit ``margin``; elsewhere uniform. It
    answers "The pass key is" with the key and continues a copied span. Only what the probes call: forward with
    or without a KVCache (it keeps the ids), decode_step, pos.max_positions, scaled_positions."""

    pos = SimpleNamespace(max_positions=lambda cfg: None)
    pos_cfg = None

    def __init__(self, vocab: int, margin: float = 30.0, last: int = 24):
        super().__init__()
        self.vocab, self.margin, self.last = vocab, margin, last

    def scaled_positions(self, *args):
        return contextlib.nullcontext()

    def forward(self, idx, cache=None, **kw):
        seq = idx if cache is None or cache.ids is None else torch.cat((cache.ids, idx), 1)
        if cache is not None:
            cache.ids = seq
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            s = seq[b].tolist()
            for t in range(max(len(s) - T, len(s) - self.last), len(s)):
                best, where = 0, None
                for j in range(t):
                    k = 0
                    while k <= j and s[j - k] == s[t - k]:
                        k += 1
                    if k > best:
                        best, where = k, j
                if where is not None:
                    logits[b, t - (len(s) - T), s[where + 1]] = self.margin
        return logits, None

    def decode_step(self, idx, cache):
        return self(idx, cache=cache)[0]


class Uniform(Induction):
    def forward(self, idx, cache=None, **kw):
        return torch.zeros(*idx.shape, self.vocab), None


def by_metric(cells) -> dict:
    return {c.metric: c.value for c in cells}


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_an_oracle_finds_every_key_and_a_uniform_model_is_at_chance(depth):
    s = settings(probe_trials=4)
    oracle = passkey_cells(Induction(V), TOK, 200, depth, s, eod_id=0, device="cpu")
    assert by_metric(oracle) == {"exact_match": 1.0, "key_rank": 1.0, "key_top1": 1.0}
    assert {(c.n, c.length, c.depth, c.status) for c in oracle} == {(4, 200, depth, "ok")}
    assert 200 - 9 - 20 < oracle[0].prompt_tokens <= 200 - 9  # the prompt leaves the answer its 9 positions
    # every key is 6 tokens (a space and 5 digits), so a uniform model ties them all: exactly chance
    uniform = passkey_cells(Uniform(V), TOK, 200, depth, s, eod_id=0, device="cpu")
    assert by_metric(uniform) == {"exact_match": 0.0, "key_rank": (DISTRACTORS + 2) / 2,
                                  "key_top1": 1 / (DISTRACTORS + 1)}
    assert {c.chance for c in uniform if c.metric != "exact_match"} == {5.5, 0.1}


def test_copy_oracle_is_exact_and_a_uniform_model_is_not():
    stream = np.array(ENCODE(" ".join(np.random.default_rng(0).choice(FILLER, 200))), dtype=np.uint16)
    s = settings(copy_span=8)
    for d in (8, 32, 128):
        cells = by_metric(copy_cells(Induction(V), ordinary_ids(TOK), stream, d, s, device="cpu"))
        assert cells["top1"] == 1.0 and cells["loss"] < 1e-6
    uniform = by_metric(copy_cells(Uniform(V), ordinary_ids(TOK), stream, 32, s, device="cpu"))
    assert uniform["loss"] == pytest.approx(np.log(V)) and uniform["top1"] < 0.2
    short = copy_cells(Induction(V), ordinary_ids(TOK), stream, 4, s, device="cpu")
    assert {(c.status, c.note) for c in short} == {("skipped", "distance 4 is shorter than eval.copy_span=8")}
    assert 0 not in ordinary_ids(TOK)  # the end-of-document token is never in a span


def tiny_lm(name="rope", **pos) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32),
                         PosConfig(name=name, **pos)).eval()


@pytest.mark.parametrize("name, pos", [("rope", {}), ("alibi", {}), ("learned", {"max_len": 256})])
def test_the_answers_read_after_one_cached_prompt_match_full_forwards(name, pos):
    model, prompt = tiny_lm(name, **pos), passkey_prompt(ENCODE, 150, 0.5, 31415).ids
    answers = [ENCODE(" 31415"), ENCODE(" 27182"), ENCODE(" 1")]
    new, lls = score_passkey(model, prompt, answers, stop_id=None, device="cpu")
    for ans, ll in zip(answers, lls, strict=True):
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + ans[:-1]]))
        lp = logits[0, len(prompt) - 1 :].log_softmax(-1)
        assert ll == pytest.approx(float(lp[torch.arange(len(ans)), torch.tensor(ans)].sum()), abs=1e-4)
    ids = list(prompt)  # greedy decoding: each new token the argmax of a full forward
    for t in new:
        with torch.no_grad():
            assert int(model(torch.tensor([ids]))[0][0, -1].argmax()) == t
        ids.append(t)
    assert len(new) == 10


def test_probes_are_seeded_and_beyond_a_table_are_na():
    model, stream = tiny_lm(), np.array(ENCODE(" ".join(FILLER * 60)), dtype=np.uint16)
    kw = dict(tok=TOK, eod_id=0, stream=stream, lengths=[160, 320], train_len=160, scaling=RopeScaling.none,
              device="cpu")
    s = settings(probe_depths=[0.5], copy_span=8, probe_trials=2)
    first, again = (run_probes(model, settings=s, **kw) for _ in range(2))
    assert [c.as_dict() for c in first] == [c.as_dict() for c in again]
    other = run_probes(model, settings=settings(probe_depths=[0.5], copy_span=8, probe_trials=2, probe_seed=1), **kw)
    assert [c.value for c in other] != [c.value for c in first]
    assert [(c.probe, c.length, c.distance) for c in first if c.metric in ("key_rank", "loss")] == \
        [("passkey", 160, None), ("passkey", 320, None)] + [("copy", None, d) for d in (40, 80, 160, 320)]
    # a learned table of 200 positions: length 320 and distance 320 (327 positions) are n/a, distance 160 (167
    # positions) and the rest scored
    learned = run_probes(tiny_lm("learned", max_len=200), settings=s, **kw)
    na = {(c.probe, c.length or c.distance) for c in learned if c.status == "n/a"}
    assert na == {("passkey", 320), ("copy", 320)}
    assert {c.note for c in learned if c.status == "n/a"} == {"n/a (table size 200)"}
    assert all(c.status == "ok" for c in learned if (c.probe, c.length or c.distance) not in na)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"probes": ["passkey", "pasword"]}, "eval.probes: 'pasword' is not a probe; choose from ['passkey', 'copy']"),
    ({"probe_trials": 0}, "eval.probe_trials=0 must be at least 1"),
    ({"probe_depths": [1.5]}, "eval.probe_depths: 1.5 must be a fraction in [0, 1]"),
    ({"probes": ["passkey"], "probe_depths": []}, "eval.probe_depths is empty"),
    ({"copy_span": 1}, "eval.copy_span=1 must be at least 2"),
])
def test_bad_probe_settings_fail_in_one_line_naming_the_key(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        EvalSettings(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_bad_probe_on_the_command_line_is_one_line():
    """Through the real config: eval.probes is a list of names, so Hydra accepts any and the schema refuses it
    in one line (an Enum list would fail in Hydra's merge with several)."""
    from hydra import compose, initialize_config_dir

    from roformer.config import to_eval_config

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="test"):
        cfg = compose("evaluate", overrides=["ckpt=x", "eval.probes=[passkey,needle]"])
    with pytest.raises(ValueError) as e:
        to_eval_config(cfg)
    assert str(e.value) == "eval.probes: 'needle' is not a probe; choose from ['passkey', 'copy'] (eval.probes=[] " \
                           "runs none)"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="test"):
        ok = to_eval_config(compose("evaluate", overrides=["ckpt=x"])).eval
    assert (ok.probes, ok.probe_seed, ok.probe_trials, ok.probe_depths, ok.copy_span) == ([], 0, 5, [0.1, 0.5, 0.9], 16)


# ---- end to end: a tiny RoPE model trained for 4 steps, evaluated with both probes ----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes")
    corpus = word_corpus(root, {"train": 12, "test": 4}, 400)
    cfg = tiny_config("pos=rope", "trainer.max_steps=4", "trainer.eval_interval=4", *corpus)
    train(cfg, root / "run")
    return root


def test_evaluate_writes_probe_rows_tables_and_terminal_lines(trained, tmp_path):
    cfg = EvalConfig(ckpt=str(trained / "run"), logger=LoggerConfig(kind="none", job_type="eval"),
                     eval=EvalSettings(**SETTINGS, lengths=[256, 512], protocols=["nonoverlapping"],
                                       probes=["passkey", "copy"], probe_trials=2, probe_depths=[0.1, 0.9]))
    res = run_evaluation(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["probes"] == json.loads(json.dumps(res["probes"]))
    assert saved["settings"]["probes"] == ["passkey", "copy"]
    rows = saved["probes"]
    passkey = [r for r in rows if r["probe"] == "passkey"]
    assert {(r["metric"], r["length"], r["depth"]) for r in passkey} == {
        (m, L, d) for m in ("exact_match", "key_rank", "key_top1") for L in (256, 512) for d in (0.1, 0.9)}
    assert {(r["label"], r["variant"], r["scheme"], r["rope_scaling"], r["seed"], r["train_len"], r["n"])
            for r in rows if r["status"] == "ok"} == {("rope", "rope", "rope", "none", 0, 32, 2)}
    assert all(r["status"] == "ok" and 1 <= r["value"] or r["metric"] != "key_rank" for r in passkey)
    # every row carries its model's identity as fields, and what kind of row it is
    ident = {"scheme": "rope", "family": "rope", "base_variant": "rope", "fine_tuned": False, "init_from": None,
             "ft_method": None, "train_scaling": "none", "table_multiple": None, "seed": 0, "bca": False}
    for kind, rs in (("probe", rows), ("perplexity", saved["results"])):
        assert rs and all({k: r[k] for k in ident} == ident and r["kind"] == kind for r in rs), kind
    header, first = (tmp_path / "results.csv").read_text().splitlines()[:2]
    assert header.endswith(",note,family,fine_tuned,init_from") and first.endswith(",rope,False,")
    assert all(r["prompt_tokens"] <= r["length"] - 9 for r in passkey)
    copy = {(r["metric"], r["distance"]): r for r in rows if r["probe"] == "copy"}
    assert sorted({d for _, d in copy}) == [8, 16, 32, 64, 128, 256, 512]  # L/4 .. the largest length, doubling
    assert copy[("top1", 8)]["status"] == "skipped" and copy[("top1", 16)]["status"] == "ok"

    md = (tmp_path / "results.md").read_text()
    for heading in ("# Retrieval probes", "### passkey: exact_match", "### passkey: key_rank", "### passkey: key_top1",
                    "### copy: loss", "### copy: top1", "| variant | depth | L=256 | L=512 |",
                    "| variant | d=8 | d=16 |"):
        assert heading in md, heading
    assert "| rope | 0.1 |" in md and "| rope | mean |" in md
    text = terminal_summary(res)
    assert text.startswith("nonoverlapping perplexity")
    assert "passkey retrieval, mean over depths 0.1, 0.9, keys and seeds; chance: key_rank 5.5, key_top1 0.1" in text
    lines = text.splitlines()
    for metric in ("exact_match", "key_rank", "key_top1", "loss", "top1"):  # every metric asked is a row
        assert any(metric in line.split() for line in lines), metric
    assert "skipped: rope distance 8 is shorter than eval.copy_span=16" in lines

    # the dashboard's rows: passkey by eval/length beside the perplexity, copy by eval/distance, summary keys
    hist = eval_history(res["results"], res["probes"])
    assert [h[EVAL_STEP] for h in hist] == [256, 512] and "eval/passkey/key_top1" in hist[0]
    assert [h[EVAL_DISTANCE] for h in distance_history(res["probes"])] == [16, 32, 64, 128, 256, 512]
    summary = probe_summary(res["probes"])
    assert {"eval/passkey_exact_match@512", "eval/copy_top1@16"} <= set(summary)
    log_evaluation(res, LoggerConfig(mode="offline"), tmp_path / "wandb_run", ["label", "length", "ppl"])
    (run,) = wandb_runs(tmp_path / "wandb_run")
    assert (run.metrics["eval/passkey/*"], run.metrics["eval/copy/*"]) == (EVAL_STEP, EVAL_DISTANCE)
    assert [h for h in run.history if EVAL_STEP in h] == hist
    assert [h for h in run.history if EVAL_DISTANCE in h] == distance_history(res["probes"])

    # a results.json from before the probes still makes its reports
    old = {k: v for k, v in saved.items() if k != "probes"}
    assert "Retrieval probes" not in markdown(old) and "passkey" not in terminal_summary(old)
