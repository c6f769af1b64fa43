"""wandb as the comparison dashboard: meaningful groups, names and tags; training and evaluation runs with the same
config paths; evaluation runs with one history row per length. Offline runs are read back from their files.
(slow) the real CLI: a sweep, then an evaluation of its checkpoints."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import wandb_runs
from omegaconf import OmegaConf
from test_training import CLI_TINY, _run

from roformer.config import swept_keys
from roformer.logger import (
    EVAL_STEP,
    LoggerConfig,
    eval_history,
    eval_key,
    eval_run_config,
    log_evaluation,
    run_names,
)

EXCLUDE = ["logger", "logger.mode", "data.train_files", "trainer.progress"]  # as configs/hydra/default.yaml


# ----------------------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("overrides,swept,experiment,scheme,tags,want", [
    # python train.py -m debug=fast pos=rope,alibi logger=wandb
    (["debug=fast", "pos=rope", "logger=wandb"], {"pos"}, None, "rope", [], ("debug=fast", "pos=rope", ["rope"])),
    # python train.py -m experiment=pos_sweep (the preset sweeps pos and seed, and tags itself)
    (["pos=alibi", "seed=1", "experiment=pos_sweep"], {"pos", "seed"}, "pos_sweep", "alibi", ["pos_sweep"],
     ("pos_sweep", "pos=alibi,seed=1", ["pos_sweep", "alibi"])),
    # a preset and fixed overrides: both name the group
    (["pos=rope", "seed=0", "experiment=pos_sweep", "trainer.max_steps=900"], {"pos", "seed"}, "pos_sweep", "rope",
     [], ("pos_sweep,trainer.max_steps=900", "pos=rope,seed=0", ["rope", "pos_sweep"])),
    # nothing fixed; paths and logger settings never name anything; names sort as Hydra's folder names
    (["seed=2", "pos=t5", "data.train_files=[a.txt,b.txt]", "logger.mode=offline", "logger.name=x"],
     {"pos", "seed"}, None, "t5",
     [], ("defaults", "pos=t5,seed=2", ["t5"])),
    # a swept preset is in the name, not the group; +key and key@package overrides match their key
    (["experiment=extrapolation", "+trainer.foo=1", "model@m=tiny"], {"experiment", "trainer.foo"},
     "extrapolation", "rope", [], ("model@m=tiny", "+trainer.foo=1,experiment=extrapolation",
                                   ["rope", "extrapolation"])),
    # single runs: the preset, else the scheme; named by their overrides, None without any
    (["pos=alibi", "seed=1", "logger=wandb"], None, None, "alibi", [], ("alibi", "pos=alibi,seed=1", ["alibi"])),
    (["experiment=extrapolation", "seed=1"], None, "extrapolation", "rope", ["extrapolation"],
     ("extrapolation", "experiment=extrapolation,seed=1", ["extrapolation", "rope"])),
    ([], None, None, "rope", ["mine"], ("rope", None, ["mine", "rope"])),
])
def test_run_names_from_overrides(overrides, swept, experiment, scheme, tags, want):
    n = run_names(overrides, swept, experiment=experiment, scheme=scheme, exclude=EXCLUDE, tags=tags)
    assert (n.group, n.name, n.tags) == want


def test_long_names_fit_wandb_and_stay_distinct():
    fixed = [f"trainer.k{i}={'x' * 20}" for i in range(8)]
    a = run_names([*fixed, "pos=rope"], {"pos"}, experiment=None, scheme="rope").group
    b = run_names([*fixed[:-1], "trainer.k7=y", "pos=rope"], {"pos"}, experiment=None, scheme="rope").group
    assert len(a) == len(b) == 128 and a != b and a.startswith("trainer.k0=")
    assert a == run_names([*fixed, "pos=alibi"], {"pos"}, experiment=None, scheme="alibi").group  # same sweep
    tags = run_names([], None, experiment="e" * 80, scheme="rope").tags
    assert tags[0] == "rope" and len(tags[1]) == 64 and tags[1].startswith("e" * 55)


def test_swept_keys_come_from_the_sweeps_multirun_yaml(tmp_path):
    """Hydra's sweeper writes multirun.yaml (the command line before expansion) into the sweep folder before any
    job starts; a job's own overrides hold one value per key. Lists and quoted commas are not sweeps."""
    OmegaConf.save({"hydra": {"overrides": {"task": [
        "debug=fast", "pos=rope,alibi", "seed=range(0,3)", "optim.lr=choice(1e-3,2e-3)",
        "data.train_files=[a.txt,b.txt]", "logger.group='a,b'", "+trainer.x=1", "trainer.max_steps=5,6",
        "trainer.max_steps=7"]}, "sweeper": {"params": {"model": "tiny,small", "trainer.max_steps": "1,2"}}}},
        tmp_path / "multirun.yaml")
    hc = OmegaConf.create({"sweep": {"dir": str(tmp_path)}})
    assert swept_keys(hc) == {"pos", "seed", "optim.lr", "model"}  # the last of a key wins
    # another sweeper (no multirun.yaml): its params
    hc = OmegaConf.create({"sweep": {"dir": str(tmp_path / "none")}, "sweeper": {"params": {"pos": "rope,alibi"}},
                           "overrides": {"task": ["pos=rope", "debug=fast"]}})
    assert swept_keys(hc) == {"pos"}


# ----------------------------------------------------------------------------------------------------------
# evaluation runs


def _results(group="g-train"):
    """A results.json-like dict: a RoPE checkpoint (with NTK) and a learned one whose table ends at 64."""

    def ck(label, scheme, seed):
        train = {"seed": seed, "pos": {"name": scheme}, "model": {"d_model": 8}, "trainer": {"seq_len": 32},
                 "data": {"name": "text_files"}, "logger": {"group": group, "name": f"pos={scheme}", "tags": ["t"]}}
        return {"label": label, "path": f"/runs/{label}/checkpoints/last.pt", "scheme": scheme, "variant": scheme,
                "attention": "softmax", "seed": seed, "train_len": 32, "step": 6, "tokens_seen": 768,
                "group": group, "config": {"model": {"d_model": 8, "vocab_size": 300}, "pos": {"name": scheme},
                                           "train": train},
                "data": {"name": "text_files"}, "split_tokens": 1000, "split_docs": 2}

    rows = []
    for label, scheme, scalings in (("a", "rope", ("none", "ntk")), ("b", "learned", ("none",))):
        for sc in scalings:
            for proto in ("nonoverlapping", "sliding"):
                for L in (64, 32, 128):  # not in order
                    na = scheme == "learned" and L > 64
                    ppl = 10.0 + L / 32 + (sc == "ntk") + (proto == "sliding") / 2
                    rows.append({"label": label, "variant": scheme + ("" if sc == "none" else f"+{sc}"),
                                 "scheme": scheme, "rope_scaling": sc, "seed": 0, "train_len": 32,
                                 "protocol": proto, "length": L, "status": "n/a" if na else "ok",
                                 "note": "n/a (table size 64)" if na else "", "ppl": None if na else ppl,
                                 "bits_per_byte": None if na else ppl / 10, "word_ppl": None if na else 2 * ppl,
                                 "ratio": None if na else ppl / (11.0 + (sc == "ntk") + (proto == "sliding") / 2)})
    return {"settings": {"lengths": [32, 64, 128], "protocols": ["nonoverlapping", "sliding"]},
            "checkpoints": [ck("a", "rope", 0), ck("b", "learned", 1)], "results": rows}


def test_eval_history_is_one_row_per_length_with_every_protocol_and_scaling():
    res = _results()
    hist = eval_history([r for r in res["results"] if r["label"] == "a"])
    assert [h[EVAL_STEP] for h in hist] == [32, 64, 128] and [h["eval/length_multiple"] for h in hist] == [1, 2, 4]
    assert eval_key("sliding", "none", "ppl") == "eval/sliding/ppl"
    assert eval_key("sliding", "ntk", "ppl") == "eval/sliding/ntk/ppl"
    assert hist[1] == {
        "eval/length": 64, "eval/length_multiple": 2.0,
        **{f"eval/{p}{s}/{m}": pytest.approx(v)
           for p, base in (("nonoverlapping", 12.0), ("sliding", 12.5))
           for s, extra in (("", 0), ("/ntk", 1))
           for m, v in (("ppl", base + extra), ("bits_per_byte", (base + extra) / 10),
                        ("word_ppl", 2 * (base + extra)), ("ratio", (base + extra) / (base + extra - 1)))},
    }
    learned = eval_history([r for r in res["results"] if r["label"] == "b"])
    assert [h[EVAL_STEP] for h in learned] == [32, 64]  # beyond its table: no row, no made-up value


def test_eval_run_config_has_the_training_runs_paths():
    ck = _results()["checkpoints"][0]
    cfg = eval_run_config(ck, {"lengths": [32]})
    assert (cfg["pos"]["name"], cfg["seed"], cfg["trainer"]["seq_len"], cfg["model"]["vocab_size"]) == \
        ("rope", 0, 32, 300)
    assert cfg["eval"]["lengths"] == [32] and cfg["eval"]["data"] == {"name": "text_files"}
    assert cfg["checkpoint"]["path"] == ck["path"] and "logger" not in cfg


def test_eval_runs_offline_join_the_training_group_and_log_rows_by_length(tmp_path):
    res = _results()
    log_evaluation(res, LoggerConfig(mode="offline", tags=["e"]), tmp_path, ["label", "variant", "length", "ppl"])
    runs = {r.get("pos.name"): r for r in wandb_runs(tmp_path)}
    assert set(runs) == {"rope", "learned"}
    rope = runs["rope"]
    assert (rope.run.run_group, rope.run.job_type, rope.run.display_name) == ("g-train", "eval", "pos=rope eval")
    assert list(rope.run.tags) == ["e", "t", "rope"] and rope.exit_code == 0
    assert (rope.get("seed"), rope.get("trainer.seq_len"), runs["learned"].get("seed")) == (0, 32, 1)
    assert rope.metrics[EVAL_STEP] == "" and rope.metrics["eval/nonoverlapping/*"] == EVAL_STEP
    rows = [h for h in rope.history if EVAL_STEP in h]
    assert rows == eval_history([r for r in res["results"] if r["label"] == "a"])
    assert any("eval/results" in k for h in rope.history for k in h)  # the table is still there
    # logger.group puts every evaluation run in one group
    log_evaluation(res, LoggerConfig(mode="offline", group="mine"), tmp_path / "g", ["label"])
    assert {r.run.run_group for r in wandb_runs(tmp_path / "g")} == {"mine"}


def test_an_evaluation_dashboard_failure_warns_and_returns(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(RuntimeWarning, match="wandb logging of the evaluation failed.*result files are written"):
        log_evaluation(_results(), LoggerConfig(mode="online"), tmp_path, ["label"])


# ----------------------------------------------------------------------------------------------------------
# the real CLI: a sweep, then its evaluation


@pytest.fixture(scope="module")
def sweep(text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "sweep"
    r = _run([sys.executable, "train.py", "-m", *CLI_TINY, *text_corpus, "pos=rope,alibi", "logger=wandb",
              "logger.mode=offline", f"hydra.sweep.dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_sweeps_runs_share_a_group_named_by_its_fixed_overrides(sweep):
    runs = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        (run,) = wandb_runs(job)
        runs[run.get("pos.name")] = run
    assert set(runs) == {"rope", "alibi"}
    groups = {r.run.run_group for r in runs.values()}
    (group,) = groups  # one group ...
    assert group != sweep.name and "pos=" not in group and len(group) <= 128  # ... not the folder's timestamp
    assert group.startswith("data.vocab_size=300,data=text_files,debug=fast,trainer.batch_size=4,")
    for scheme, r in runs.items():
        assert (r.run.display_name, list(r.run.tags), r.run.job_type) == (f"pos={scheme}", [scheme], "train")
        assert (r.get("seed"), r.get("trainer.seq_len"), r.get("model.n_layer")) == (0, 32, 2)
        assert r.exit_code == 0


@pytest.mark.slow
def test_evaluation_runs_join_their_training_runs_with_one_row_per_length(sweep, tmp_path):
    out = tmp_path / "eval"
    r = _run([sys.executable, "evaluate.py", f"ckpt={sweep}", "logger=wandb", "logger.mode=offline",
              "eval.lengths=[32,64,96]", "eval.protocols=[nonoverlapping,sliding]", "eval.rope_scaling=[none,ntk]",
              "eval.max_tokens=1024", "eval.progress=false", f"hydra.run.dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    trained = {}
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        (t,) = wandb_runs(job)
        trained[t.get("pos.name")] = t
    evals = {e.get("pos.name"): e for e in wandb_runs(out)}
    assert set(evals) == {"rope", "alibi"}
    for scheme, e in evals.items():
        t = trained[scheme]
        assert (e.run.run_group, e.run.job_type, e.run.display_name) == \
            (t.run.run_group, "eval", f"{t.run.display_name} eval")
        for key in ("seed", "trainer.seq_len", "model.d_model", "pos.base"):
            assert e.get(key) == t.get(key), key
        assert e.get("eval.lengths") == [32, 64, 96]
        rows = [h for h in e.history if EVAL_STEP in h]
        assert [h[EVAL_STEP] for h in rows] == [32, 64, 96]
        cells = [c for c in results["results"] if c["scheme"] == scheme]
        assert len(cells) == 3 * 2 * (2 if scheme == "rope" else 1)
        for c in cells:
            row = rows[[32, 64, 96].index(c["length"])]
            for m in ("ppl", "ratio", "bits_per_byte"):
                assert row[eval_key(c["protocol"], c["rope_scaling"], m)] == pytest.approx(c[m], rel=1e-12)
        assert ("eval/nonoverlapping/ntk/ppl" in rows[0]) == (scheme == "rope")
