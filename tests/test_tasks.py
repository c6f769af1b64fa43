"""Algorithmic tasks (data=task): the formats, answers checked by independent solvers, lengths and bins, the word-level
vocabulary, prompt masking, the example sampler (determinism, resume, ranks), the in-memory data, scoring against
greedy decoding, and a short training run whose loss on copy goes down."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, read_metrics, tiny_config

from roformer import checkpoint as ckpt_lib
from roformer.data import IGNORE_INDEX, DataConfig, DataError, ExampleSampler, example_batch, open_prepared, prepare
from roformer.data import tasks as T
from roformer.data.tokenizer import from_json
from roformer.eval_run import EvalConfig, run_evaluation
from roformer.evaluation import EvalSettings
from roformer.generation import generate
from roformer.logger import LoggerConfig
from roformer.model import TransformerLM
from roformer.probe_report import task_table
from roformer.reporting import terminal_summary
from roformer.tasks import bin_examples, checkpoint_bins, correct, is_task, score_task
from roformer.training import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

# ----------------------------------------------------------------------------------------------------------
# Formats and answers

EXPECTED = {  # sample(task, 4, default_rng(0)): the formats of Kazemnejad et al. App. D.1 (recall: bare multi-query)
    "copy": ("Copy the following words: wa qo ne he", "wa qo ne he"),
    "reverse": ("Reverse the following words: wa qo ne he", "he ne qo wa"),
    "addition": ("Compute: 3 6 5 2 + 8 0 0 1 ?", "The answer is 1 1 6 5 3 ."),
    "sorting": ("Sort the following numbers: 85 63 51 26", "The answer is 26 51 63 85 ."),
    "parity": ("Is the number of 1's even in [ 1 1 1 0 ] ?", "The answer is No ."),
    "summation": ("Compute: 8 + 6 + 5 + 2 ?", "The answer is 1 ."),
    "associative_recall": ("he 0 na 1 vi 8 qi 6", "he 0 vi 8 qi 6 na 1"),
}


def test_every_task_has_its_exact_format_for_a_fixed_seed():
    assert set(EXPECTED) == set(T.TASKS) == set(T.TASK_NAMES)
    for task, want in EXPECTED.items():
        assert T.sample(task, 4, np.random.default_rng(0)) == want, task


def solve(task: str, prompt: str, answer: str) -> tuple[str, int]:
    """An independent solver: (answer text, instance length) read from the prompt text alone; for recall, whose
    asker chooses the order of the keys, the keys are read from the answer (each key of the prompt once)."""
    w = prompt.split()
    if task in ("copy", "reverse"):
        assert w[:4] == [task.capitalize(), "the", "following", "words:"]
        words = w[4:]
        return " ".join(words if task == "copy" else reversed(words)), len(words)
    if task == "addition":
        m = re.fullmatch(r"Compute: ((?:\d )+)\+ ((?:\d )+)\?", prompt)
        a, b = (g.replace(" ", "") for g in m.groups())
        assert len(a) == len(b) and (len(a) == 1 or a[0] != "0" and b[0] != "0")
        return "The answer is " + " ".join(str(int(a) + int(b))) + " .", len(a)
    if task == "sorting":
        assert w[:4] == ["Sort", "the", "following", "numbers:"]
        nums = [int(x) for x in w[4:]]
        assert all(0 <= x < 100 for x in nums)
        return "The answer is " + " ".join(map(str, sorted(nums))) + " .", len(nums)
    if task == "parity":
        m = re.fullmatch(r"Is the number of 1's even in \[ ((?:[01] )+)\] \?", prompt)
        bits = m.group(1).split()
        return f"The answer is {'Yes' if bits.count('1') % 2 == 0 else 'No'} .", len(bits)
    if task == "summation":
        m = re.fullmatch(r"Compute: (\d(?: \+ \d)*) \?", prompt)
        terms = [int(x) for x in m.group(1).split(" + ")]
        return f"The answer is {sum(terms) % 10} .", len(terms)
    if task == "associative_recall":
        assert re.fullmatch(r"[a-z]{2} \d(?: [a-z]{2} \d)*", prompt)
        keys, values = w[0::2], w[1::2]
        assert len(set(keys)) == len(keys)  # unambiguous
        asked = answer.split()[0::2]
        assert sorted(asked) == sorted(keys)  # every key once
        value = dict(zip(keys, values, strict=True))
        return " ".join(f"{k} {value[k]}" for k in asked), len(keys)
    raise AssertionError(task)


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_answers_match_an_independent_solver_at_every_length(task):
    rng = np.random.default_rng(1)
    top = 4 * T.TASKS[task].default_max_len
    for length in [*range(1, 12), *rng.integers(1, top + 1, size=100)]:
        prompt, answer = T.sample(task, int(length), rng)
        assert solve(task, prompt, answer) == (answer, length), (prompt, answer)


def test_generated_lengths_fill_their_range_and_match_the_text():
    for task, spec in T.TASKS.items():
        ex = T.generate(task, 400, 5, 9, seed=0, stream=(7,))
        assert set(ex.lengths.tolist()) == set(range(5, 10)), task
        vocab = T.vocabulary(task)
        for i in range(20):
            words = [vocab[t] for t in ex.example(i)]
            p, sep = int(ex.prompt_lens[i]), int(spec.separator)
            assert words[-1] == T.EOD_TOKEN and (words[p - 1] == T.SEP_TOKEN) == spec.separator  # prompt <sep> answer
            prompt, answer = " ".join(words[: p - sep]), " ".join(words[p:-1])
            assert solve(task, prompt, answer) == (answer, ex.lengths[i])


def test_scored_tokens_are_the_answer_and_end_or_recalls_values_only():
    for task, spec in T.TASKS.items():
        ex = T.generate(task, 50, 1, 9, seed=0, stream=(7,))
        assert ex.scored.shape == ex.tokens.shape and ex.scored.dtype == bool
        for i in range(len(ex)):
            s, e, p = int(ex.offsets[i]), int(ex.offsets[i + 1]), int(ex.prompt_lens[i])
            marks = ex.scored[s:e]
            assert not marks[:p].any()  # never the prompt (nor its separator)
            if task == "associative_recall":  # the values (every second answer word), not the keys nor the end
                assert marks.nonzero()[0].tolist() == list(range(p + 1, e - s - 1, 2))
                assert all(T.vocabulary(task)[t] in T.DIGITS for t in ex.example(i)[marks])
                assert int(marks.sum()) == ex.lengths[i]
            else:
                assert marks[p:].all() and not spec.given


def test_length_bins_reach_mult_times_L():
    assert T.length_bins(20, 4) == [(1, 20), (21, 40), (41, 60), (61, 80)]
    assert T.length_bins(8, 2) == [(1, 8), (9, 16)]
    for lo, hi in T.length_bins(8, 4):
        ex = bin_examples("addition", lo, hi, 50, seed=0)
        assert lo <= ex.meta["lengths"].min() and ex.meta["lengths"].max() <= hi


def test_same_seed_same_examples_other_seed_or_stream_others():
    a, b = (T.generate("copy", 50, 1, 20, seed=3, stream=(0,)) for _ in range(2))
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.prompt_lens, b.prompt_lens)
    assert not np.array_equal(a.tokens, T.generate("copy", 50, 1, 20, seed=4, stream=(0,)).tokens)
    assert not np.array_equal(a.tokens, T.generate("copy", 50, 1, 20, seed=3, stream=(1,)).tokens)


def test_recall_refuses_more_pairs_than_keys():
    with pytest.raises(ValueError, match="at most 100 pairs"):
        T.generate("associative_recall", 1, 1, 101, seed=0, stream=(0,))


# ----------------------------------------------------------------------------------------------------------
# Vocabulary and tokenizer


@pytest.mark.parametrize("task", sorted(T.TASKS))
def test_tokenizer_is_the_tasks_word_level_vocabulary(task):
    tok = T.tokenizer(task)
    vocab = T.vocabulary(task)
    assert vocab[:4] == [T.PAD_TOKEN, T.EOD_TOKEN, T.UNK_TOKEN, T.SEP_TOKEN] and len(set(vocab)) == len(vocab) <= 130
    assert [tok.id_to_token(i) for i in range(tok.get_vocab_size())] == vocab
    tok = from_json(tok.to_str())  # as a checkpoint restores it
    ex = T.generate(task, 30, 1, 2 * T.TASKS[task].default_max_len, seed=0, stream=(0,))
    for i in range(len(ex)):
        ids, p = ex.example(i).tolist(), int(ex.prompt_lens[i])
        prompt, answer = tok.decode(ids[:p]), tok.decode(ids[p:])  # the specials dropped
        sep = " <sep> " if T.TASKS[task].separator else " "
        assert tok.encode(f"{prompt}{sep}{answer}").ids + [T.EOD_ID] == ids  # the generator's ids are the tokenizer's
        assert T.UNK_ID not in ids


# ----------------------------------------------------------------------------------------------------------
# Data config and the in-memory data


def test_data_config_fills_the_task_default_and_checks_task_keys():
    assert DataConfig(name="task").task_max_len == 10
    assert DataConfig(name="task", task="addition").task_max_len == 2
    assert DataConfig(name="task", task="parity", task_max_len=5).task_max_len == 5
    assert DataConfig().task_max_len is None  # a corpus does not read the task keys
    with pytest.raises(DataError, match="data.task='copies' is not one of: copy, reverse"):
        DataConfig(name="task", task="copies")
    with pytest.raises(DataError, match="data.task_max_len=0 must be >= 1"):
        DataConfig(name="task", task_max_len=0)
    with pytest.raises(DataError, match="= 120 pairs, but associative_recall makes at most 100"):
        DataConfig(name="task", task="associative_recall", task_max_len=30)
    with pytest.raises(DataError, match="tokenizer_path does not apply"):
        DataConfig(name="task", tokenizer_path="tok.json")


def test_prepare_generates_in_memory_deterministically_and_writes_nothing(tmp_path):
    cfg = DataConfig(name="task", task="reverse", task_max_len=6, task_train_size=300, task_val_size=40,
                     cache_dir=str(tmp_path / "data"))
    a, b = prepare(cfg), open_prepared(cfg)
    assert not (tmp_path / "data").exists()
    assert a.tokenizer_json == b.tokenizer_json and a.vocab_size == len(T.vocabulary("reverse"))
    for split, n, top in (("train", 300, 6), ("validation", 40, 6), ("test", 40, 24)):
        s = a.splits[split]
        assert np.array_equal(s.tokens, b.splits[split].tokens) and s.n_docs == n and s.pad_id == T.PAD_ID
        assert s.meta["lengths"] == [1, top] and len(s.prompt_lens) == n
        lengths = [solve("reverse", a.tokenizer.decode(s.doc(i)[: s.prompt_lens[i]].tolist()), "")[1]
                   for i in range(n)]
        assert 1 <= min(lengths) and max(lengths) <= top
    assert max(lengths) > 6  # the test split reaches past L
    assert all(np.array_equal(s.scored, b.splits[n].scored) for n, s in a.splits.items())
    train_ = a.splits["train"].tokens
    other = prepare(DataConfig(name="task", task="reverse", task_max_len=6, task_train_size=300, task_seed=1))
    assert not np.array_equal(train_, other.splits["train"].tokens)


def test_recall_trains_and_validates_on_exactly_L_pairs_and_tests_from_one():
    data = prepare(DataConfig(name="task", task="associative_recall", task_max_len=5, task_train_size=300,
                              task_val_size=200))
    for split, want in (("train", {5}), ("validation", {5}), ("test", set(range(1, 21)))):
        s = data.splits[split]
        pairs = [len(data.tokenizer.decode(s.doc(i)[: s.prompt_lens[i]].tolist()).split()) // 2
                 for i in range(s.n_docs)]
        assert set(pairs) == want and s.meta["lengths"] == [min(want), max(want)], split
        assert int(s.scored.sum()) == sum(pairs)  # one value per pair asked


# ----------------------------------------------------------------------------------------------------------
# Masking and the sampler


@pytest.fixture(scope="module")
def addition():
    return prepare(DataConfig(name="task", task="addition", task_max_len=8, task_train_size=2000, task_val_size=64))


def test_loss_positions_are_exactly_the_answer_and_end_of_example(addition):
    split = addition.splits["train"]
    idx = np.arange(16)
    x, y = example_batch(split, idx)
    sizes = np.diff(split.doc_offsets)[idx]
    assert x.shape == y.shape == (16, sizes.max() - 1) and x.dtype == y.dtype == torch.int64
    for row, i in enumerate(idx):
        ex, p, n = split.doc(i).astype(np.int64), int(split.prompt_lens[i]), int(sizes[row])
        scored = (y[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored == list(range(p - 1, n - 1))  # from the separator to the answer's last token
        assert y[row, scored].tolist() == ex[p:].tolist() and ex[-1] == T.EOD_ID
        assert addition.tokenizer.decode(ex[p:].tolist(), skip_special_tokens=True).startswith("The answer is")
        assert x[row, : n - 1].tolist() == ex[:-1].tolist() and (x[row, n - 1 :] == T.PAD_ID).all()


def test_the_models_loss_is_the_mean_over_answer_tokens_only(addition):
    """kernels.cross_entropy skips IGNORE_INDEX (-100) targets, so the model's mean loss is over the answers."""
    cfg = tiny_config("data=task", "data.task=addition")
    cfg.model.vocab_size = addition.vocab_size
    model = TransformerLM(cfg.model, cfg.pos).eval()
    x, y = example_batch(addition.splits["train"], np.arange(8))
    logits, loss = model(x, y)
    keep = y != IGNORE_INDEX
    ref = F.cross_entropy(logits[keep].float(), y[keep])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    x2 = x.clone()
    x2[x2 == T.PAD_ID] = 5  # padding sits after every scored position: it changes nothing
    assert model(x2, y)[1].item() == pytest.approx(loss.item(), rel=1e-6)


def test_sampler_is_deterministic_and_resumes_exactly(addition):
    split = addition.splits["train"]
    a, b = (ExampleSampler(split, seq_len=64, batch_size=8, seed=5) for _ in range(2))
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ExampleSampler(split, 64, 8, seed=6).next_batch()[0], xa)
    state = a.state_dict()
    want = [a.next_batch() for _ in range(3)]
    resumed = ExampleSampler(split, 64, 8, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert resumed.step == 3 and resumed.seq_len == int(np.diff(split.doc_offsets).max()) - 1
    for (x, y), (xw, yw) in zip((resumed.next_batch() for _ in range(3)), want, strict=True):
        assert torch.equal(x, xw) and torch.equal(y, yw)


def test_ranks_take_disjoint_slices_of_one_global_batch(addition):
    split = addition.splits["train"]
    ranks = [ExampleSampler(split, 64, 4, seed=3, rank=r, world_size=3) for r in range(3)]
    single = ExampleSampler(split, 64, 12, seed=3)
    for _ in range(3):
        parts = [s.next_offsets() for s in ranks]
        assert np.array_equal(np.concatenate(parts), single.next_offsets())
        assert len(set(np.concatenate(parts).tolist())) == 12


def test_sampler_refuses_a_short_seq_len_and_a_corpus_split(addition, toy_data):
    split = addition.splits["train"]
    width = int(np.diff(split.doc_offsets).max()) - 1
    with pytest.raises(ValueError, match=f"has {width + 1} tokens: trainer.seq_len=16 must be at least {width}"):
        ExampleSampler(split, seq_len=16, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="no task examples"):
        ExampleSampler(toy_data.splits["train"], seq_len=16, batch_size=4, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Training and scoring

COPY = ["data=task", "data.task=copy", "data.task_max_len=4", "data.task_train_size=4000", "data.task_val_size=64",
        "model.d_model=128", "model.n_head=4", "trainer.batch_size=32", "optim.lr=3e-3", "optim.warmup_steps=20"]


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("copy")
    train(tiny_config(*COPY, "trainer.max_steps=200", "trainer.eval_interval=50"), run)  # ~10 s
    return run


def test_training_on_copy_lowers_the_answer_loss_and_records_the_task(copy_run):
    rows = read_metrics(copy_run)
    first = next(r["train/loss"] for r in rows if "train/loss" in r)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert first > math.log(100) - 1.0  # near uniform over the words at first
    assert val[-1] < first / 2 and val[-1] < val[0]
    ck = ckpt_lib.load_checkpoint(copy_run)
    dc = DataConfig(**ck["data_cfg"])
    assert is_task(dc) and (dc.task, dc.task_max_len, dc.task_seed, dc.task_test_max_mult) == ("copy", 4, 0, 4)
    assert checkpoint_bins(dc) == [(1, 4), (5, 8), (9, 12), (13, 16)]
    assert ck["model_cfg"]["vocab_size"] == len(T.vocabulary("copy"))
    assert ck["tokens_seen"] == 200 * 32 * (4 + 4 + 1 + 4 + 1 - 1)  # the batches' width: the longest example - 1


def test_score_task_is_exact_match_of_greedy_decoding(copy_run):
    ck = ckpt_lib.load_checkpoint(copy_run)
    model, tok = ckpt_lib.model_from_checkpoint(ck), from_json(ck["tokenizer_json"])
    rows = score_task(model, tok, "copy", [(1, 4), (5, 8)], n_per_bin=40, seed=0, device="cpu", batch_size=16)
    assert [(r["task"], r["bin"], r["n"]) for r in rows] == [("copy", (1, 4), 40), ("copy", (5, 8), 40)]
    assert rows[0]["accuracy"] > 0.3 and rows[0]["accuracy"] == rows[0]["n_correct"] / 40
    for lo, hi in [(1, 4), (5, 8)]:
        ex = bin_examples("copy", lo, hi, 40, seed=0)
        fast = correct(model, ex, np.arange(40), "cpu")
        for i in range(40):
            ids, p = ex.doc(i).tolist(), int(ex.prompt_lens[i])
            out = list(generate(model, ids[:p], max_new_tokens=len(ids) - p + 2, stop_id=T.EOD_ID))
            assert fast[i] == (out == ids[p:-1]), (lo, hi, i)  # the answer, then EOD (the generator stops on it)
        if lo == 1:
            assert fast.sum() == rows[0]["n_correct"]


class RecallOracle(torch.nn.Module):
    """A stand-in model that does associative recall by table look-up: after a key seen before it predicts the
    token that followed that key's first place (``wrong_from``: from that many look-ups on, the value + 1), and
    elsewhere the padding, which is never a token to produce."""

    def __init__(self, wrong_from: int | None = None):
        super().__init__()
        vocab = T.vocabulary("associative_recall")
        self.vocab_size, self.wrong_from = len(vocab), wrong_from
        self.keys = {i for i, w in enumerate(vocab) if w in T.SYLLABLES}

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab_size)
        logits[..., T.PAD_ID] = 1.0
        for b, row in enumerate(x.tolist()):
            first, asked = {}, 0
            for t, tok in enumerate(row):
                if tok in first and tok in self.keys:
                    want = row[first[tok] + 1]
                    if self.wrong_from is not None and asked >= self.wrong_from:
                        want = want + 1 if want + 1 < self.vocab_size else want - 1
                    logits[b, t, want], asked = 2.0, asked + 1
                first.setdefault(tok, t)
        return logits, None


def test_recall_is_right_when_every_value_is_whatever_comes_after_them():
    ex = bin_examples("associative_recall", 1, 6, 60, seed=0)
    n_pairs = ex.meta["lengths"]
    assert correct(RecallOracle(), ex, np.arange(60), "cpu").all()  # keys and the end are not the model's to say
    third_wrong = correct(RecallOracle(wrong_from=2), ex, np.arange(60), "cpu")
    assert np.array_equal(third_wrong, n_pairs <= 2)  # one wrong value of any number makes the example wrong


def test_score_task_gives_na_past_a_learned_table_and_refuses_another_tasks_tokenizer():
    cfg = tiny_config("data=task", "pos=learned", "pos.max_len=32")
    cfg.model.vocab_size = len(T.vocabulary("copy"))
    model = TransformerLM(cfg.model, cfg.pos)
    rows = score_task(model, T.tokenizer("copy"), "copy", [(1, 4), (30, 40)], n_per_bin=8, seed=0, device="cpu")
    assert rows[0]["accuracy"] is not None and rows[1]["accuracy"] is None and rows[1]["max_tokens"] > 33
    with pytest.raises(ValueError, match="not task copy's vocabulary"):
        score_task(model, T.tokenizer("addition"), "copy", [(1, 4)], n_per_bin=8, seed=0, device="cpu")


def test_a_task_run_resumes_bit_exactly(tmp_path):
    over = [*COPY, "trainer.max_steps=12", "trainer.eval_interval=6", "trainer.keep_last=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(*over), straight)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints/step_000006.pt", resumed / "checkpoints/last.pt")
    train(tiny_config(*over, "trainer.resume=auto"), resumed)

    def after6(run):
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in read_metrics(run)
                if r["trainer/step"] > 6]

    assert after6(resumed) == after6(straight) and after6(straight)


def test_prepare_data_cli_prints_the_task_counts(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_data.py"), "data=task", "data.task=parity",
           "data.task_train_size=500", "data.task_val_size=50", "progress=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"(?m)^train +500 ", proc.stdout) and "generated in memory" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_evaluate_scores_a_task_checkpoint_by_exact_match_per_bin(tmp_path, capsys):
    """evaluate.py on a task run: no perplexity, a row per length bin in results.json, results.md and the terminal."""
    cfg = tiny_config("data=task", "data.task=parity", "data.task_max_len=4", "data.task_train_size=2000",
                      "data.task_val_size=50", "trainer.max_steps=3", "trainer.eval_interval=3")
    train(cfg, tmp_path / "run")
    res = run_evaluation(EvalConfig(ckpt=str(tmp_path / "run"), logger=LoggerConfig(kind="none", job_type="eval"),
                                    eval=EvalSettings(device="cpu", progress=False, task_examples=20)),
                         tmp_path / "eval")
    assert res["results"] == [] and res["probes"] == []
    bins = [(r["bin_lo"], r["bin_hi"]) for r in res["tasks"]]
    assert bins == [(1, 4), (5, 8), (9, 12), (13, 16)]
    assert all(r["task"] == "parity" and r["n"] == 20 and r["value"] == r["n_correct"] / 20 for r in res["tasks"])
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "## Tasks: exact match" in md and "### parity: trained on 1-4 bits" in md and "| rope | 1 |" in md
    text = terminal_summary(res)
    assert "exact match of greedy decoding per instance-length bin" in text and "1-4" in text and "13-16" in text


def test_task_tables_give_each_tasks_training_lengths_in_its_unit():
    rows = [{"task": task, "variant": "rope", "seed": 0, "bin_lo": lo, "bin_hi": lo + 3, "train_len": 4, "value": v}
            for task in ("copy", "associative_recall") for lo, v in ((1, 1.0), (5, 0.25))]
    md = task_table({"tasks": rows}, markdown=True)
    assert "### copy: trained on 1-4 words" in md and "### associative_recall: trained on 4 pairs" in md
    assert md.count("| rope | 1 | 1.000 | 0.250 |") == 2
