"""scripts/run_study.py reads its variants and presets from configs/ and runs the same commands as before.

The expected commands are written out from the dicts the script held before configs/run_study.yaml and
configs/study/ replaced them (OLD_VARIANTS, OLD_PRESETS, old_commands), so a config edit that changes what a
study runs fails here. No training: the commands are built, or main() runs with its subprocess call replaced.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
from conftest import CONFIGS, REPO

from roformer.positional import SCHEMES

spec = importlib.util.spec_from_file_location("run_study", REPO / "scripts" / "run_study.py")
run_study = importlib.util.module_from_spec(spec)
sys.modules["run_study"] = run_study  # dataclasses and OmegaConf look their module up by name
spec.loader.exec_module(run_study)

PY = sys.executable
OLD_VARIANTS = {
    "rope": ["pos=rope"],
    "sinusoidal": ["pos=sinusoidal"],
    "learned": ["pos=learned"],
    "alibi": ["pos=alibi"],
    "nope": ["pos=nope"],
    "relative": ["pos=relative"],
    "t5": ["pos=t5"],
    "rope+linear": ["pos=rope", "model.attention=linear"],
}
OLD_PRESETS = {
    "cpu": dict(
        experiment="extrapolation",
        seeds=[0, 1, 2],
        multipliers=[1, 1.25, 1.5, 2, 4, 5, 8, 16, 24],
        eval=["eval.max_tokens=16384", "eval.max_docs=16", "eval.target_tokens=128", "eval.bf16=true"],
    ),
    "quick": dict(
        experiment="extrapolation_quick",
        seeds=[0],
        multipliers=[1, 2, 4, 8, 16],
        eval=["eval.max_tokens=8192", "eval.max_docs=8", "eval.target_tokens=128", "eval.bf16=true"],
    ),
    "gpu": dict(
        experiment="extrapolation_gpu",
        seeds=[0, 1, 2],
        multipliers=[1, 1.25, 1.5, 2, 4, 5, 8, 16, 24],
        # max_docs=0 (every document) is now explicit: it was evaluate.py's default, which now caps at 32
        eval=["eval.max_tokens=262144", "eval.max_docs=0", "eval.target_tokens=256", "eval.bf16=true"],
    ),
}


NEW_VARIANTS = ["learned-32L", "sinusoidal-fairseq"]  # the baselines issue 16 added
# the schemes registered since (issue 21): variants by name, after the ones configs/run_study.yaml orders
NEW_SCHEMES = sorted(set(SCHEMES) - set(OLD_VARIANTS))
STUDY_VARIANTS = [*(v for v in OLD_VARIANTS if v in SCHEMES), *NEW_SCHEMES, "rope+linear", *NEW_VARIANTS]


def old_commands(preset: str, variants: list[str], seeds: list[int], out: Path, logger: str, extra: list[str]):
    """The train.py commands (seed-major) and the evaluate.py command of the script before this change."""
    p, group = OLD_PRESETS[preset], out.name
    train = [
        [PY, "train.py", f"experiment={p['experiment']}", *OLD_VARIANTS[v], f"seed={seed}", f"logger={logger}",
         f"logger.group={group}-{v}", f"logger.tags=[extrapolation,{group}]", f"logger.name={v}-seed{seed}",
         "trainer.progress=false", *extra,
         f"hydra.run.dir='{out / 'runs' / ','.join(OLD_VARIANTS[v] + [f'seed={seed}'])}'"]
        for seed in seeds for v in variants
    ]  # fmt: skip
    mult = ",".join(str(m) for m in p["multipliers"])
    evaluate = [PY, "evaluate.py", f"ckpt=['{out / 'runs'}']", f"eval.multipliers=[{mult}]",
                "eval.rope_scaling=[none,pi,ntk,dynamic_ntk,yarn]", "eval.progress=false", *p["eval"],
                f"logger={logger}", f"logger.tags=[extrapolation,{group}]",
                f"hydra.run.dir='{out / 'eval'}'"]  # fmt: skip
    return train, evaluate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_cpu_preset_commands_written_out():
    study, out = run_study.load_study("cpu"), Path("/studies/cpu")
    runs = run_study.train_runs(study, ["rope", "learned", "rope+linear"], [0], out, "wandb", [])
    assert [(name, run_dir) for name, run_dir, _ in runs] == [
        ("pos=rope,seed=0", out / "runs" / "pos=rope,seed=0"),
        ("pos=learned,seed=0", out / "runs" / "pos=learned,seed=0"),
        ("pos=rope,model.attention=linear,seed=0", out / "runs" / "pos=rope,model.attention=linear,seed=0"),
    ]
    assert [cmd for _, _, cmd in runs] == [
        [PY, "train.py", "experiment=extrapolation", "pos=rope", "seed=0", "logger=wandb", "logger.group=cpu-rope",
         "logger.tags=[extrapolation,cpu]", "logger.name=rope-seed0", "trainer.progress=false",
         "hydra.run.dir='/studies/cpu/runs/pos=rope,seed=0'"],
        [PY, "train.py", "experiment=extrapolation", "pos=learned", "seed=0", "logger=wandb",
         "logger.group=cpu-learned", "logger.tags=[extrapolation,cpu]", "logger.name=learned-seed0",
         "trainer.progress=false", "hydra.run.dir='/studies/cpu/runs/pos=learned,seed=0'"],
        [PY, "train.py", "experiment=extrapolation", "pos=rope", "model.attention=linear", "seed=0", "logger=wandb",
         "logger.group=cpu-rope+linear", "logger.tags=[extrapolation,cpu]", "logger.name=rope+linear-seed0",
         "trainer.progress=false", "hydra.run.dir='/studies/cpu/runs/pos=rope,model.attention=linear,seed=0'"],
    ]  # fmt: skip
    assert run_study.eval_command(study, out, "wandb", [0]) == [
        PY, "evaluate.py", "ckpt=['/studies/cpu/runs']", "eval.multipliers=[1,1.25,1.5,2,4,5,8,16,24]",
        "eval.rope_scaling=[none,pi,ntk,dynamic_ntk,yarn]", "eval.progress=false", "eval.max_tokens=16384",
        "eval.max_docs=16", "eval.target_tokens=128", "eval.bf16=true", "logger=wandb",
        "logger.tags=[extrapolation,cpu]", "hydra.run.dir='/studies/cpu/eval'",
    ]  # fmt: skip
    assert study.preset.seeds == [0, 1, 2]


@pytest.mark.parametrize("preset", sorted(OLD_PRESETS))
@pytest.mark.parametrize("logger,extra", [("wandb", []), ("none", ["optim.lr=1e-3", "data=sotu"])])
def test_every_preset_runs_the_commands_it_ran_before(preset, logger, extra):
    study, out = run_study.load_study(preset), Path("/somewhere") / f"my-{preset}"
    # the old variants, in their order, with the schemes registered since, then the two baselines of issue 16
    assert list(study.variants) == STUDY_VARIANTS
    assert {v: study.variants[v] for v in OLD_VARIANTS} == OLD_VARIANTS
    assert study.preset.seeds == OLD_PRESETS[preset]["seeds"]
    train, evaluate = old_commands(preset, list(OLD_VARIANTS), study.preset.seeds, out, logger, extra)
    assert [cmd for _, _, cmd in run_study.train_runs(study, list(OLD_VARIANTS), study.preset.seeds, out,
                                                      logger, extra)] == train  # fmt: skip
    assert run_study.eval_command(study, out, logger, study.preset.seeds) == evaluate


def run_main(monkeypatch, argv: list[str]) -> tuple[int, list[list[str]]]:
    """main() with ``argv``, recording the commands instead of running them."""
    cmds = []
    monkeypatch.setattr(run_study, "sh", lambda cmd, log: cmds.append(cmd) or 0)
    monkeypatch.setattr(run_study, "write_report", lambda out: None)
    monkeypatch.setattr(sys, "argv", ["run_study.py", *argv])
    return run_study.main(), cmds


def test_main_runs_the_chosen_variants_seeds_and_overrides_and_skips_trained_runs(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    done = out / "runs" / "pos=learned,seed=3" / "checkpoints"
    done.mkdir(parents=True)
    (done / "last.pt").write_bytes(b"")
    rc, cmds = run_main(monkeypatch, ["--preset", "quick", "--out", str(out), "--variants", "rope+linear,learned",
                                      "--seeds", "3,1", "--logger", "none", "--", "optim.lr=1e-3"])  # fmt: skip
    train, evaluate = old_commands("quick", ["rope+linear", "learned"], [3, 1], out, "none", ["optim.lr=1e-3"])
    assert rc == 0 and cmds == [train[0], train[2], train[3], evaluate]  # learned seed 3 is already trained
    record = json.loads((out / "study.json").read_text())
    assert list(record) == ["command", "commit", "machine", "preset", "seeds", "variants", "tasks", "jobs", "runs",
                            "train_seconds", "eval_seconds", "wall_seconds", "eval_exit_code"]  # fmt: skip
    assert (record["tasks"], record["jobs"]) == ([], 1)
    assert (record["preset"], record["seeds"], record["variants"]) == ("quick", [3, 1], ["rope+linear", "learned"])
    assert record["command"] == (f"python run_study.py --preset quick --out {out} --variants rope+linear,learned "
                                 "--seeds 3,1 --logger none -- optim.lr=1e-3")
    assert [r["run"] for r in record["runs"]] == [
        "pos=rope,model.attention=linear,seed=3", "pos=rope,model.attention=linear,seed=1", "pos=learned,seed=1"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["runs", "study.json"]  # no temporary files

    rc, cmds = run_main(monkeypatch, ["--out", str(out), "--skip-train"])
    assert rc == 0 and cmds == [old_commands("cpu", [], [], out, "wandb", [])[1]]
    assert json.loads((out / "study.json").read_text())["variants"] == STUDY_VARIANTS


def test_variants_are_the_schemes_in_the_study_order_then_the_named_ones():
    study = run_study.load_study("cpu")
    pos_order = ["rope", "sinusoidal", "learned", "alibi", "nope", "relative", "t5"]
    others = sorted(set(SCHEMES) - set(pos_order))  # a new scheme is a variant without being listed anywhere
    assert list(study.variants) == [*pos_order, *others, "rope+linear", *NEW_VARIANTS]
    assert all(study.variants[v] == [f"pos={v}"] for v in SCHEMES)


def test_a_new_scheme_is_a_variant(monkeypatch):
    monkeypatch.setattr(run_study, "SCHEMES", {**SCHEMES, "zpos": object})
    variants = run_study.load_study("cpu").variants
    assert list(variants)[-4:-2] == ["zpos", "rope+linear"] and variants["zpos"] == ["pos=zpos"]


@pytest.mark.parametrize("preset", options("study"))
def test_every_preset_loads_and_names_an_experiment_that_exists(preset):
    assert options("study") == ["cpu", "extension", "generalization", "gpu", "quick", "recall", "zoo"]
    assert run_study.load_study(preset).preset.experiment in options("experiment")
    if preset == "recall":  # recall alone, apart from the paper's five tasks (its own ranking)
        recall = run_study.load_study(preset).preset
        assert (recall.tasks, recall.task_overrides, recall.schemes_only) == (["associative_recall"], {}, True)


@pytest.mark.parametrize("argv,message", [
    (["--variants", "rope,rotary"], "error: --variants: unknown ['rotary']; choose from ['rope', 'sinusoidal', "),
    (["--preset", "tpu"], "error: argument --preset: invalid choice: 'tpu' (choose from 'cpu', 'extension', "
                          "'generalization', 'gpu', 'quick', 'recall', 'zoo')"),
    (["--preset", "generalization", "--tasks", "copy,lego"], "error: --tasks: ['lego'] are not tasks of --preset "
                                                              "generalization; choose from ['copy', "),
    (["--jobs", "0"], "error: --jobs 0: run at least 1 training run at once"),
    (["--seeds", "0,one"], "error: --seeds: '0,one' is not a comma-separated list of integers"),
])  # fmt: skip
def test_a_bad_argument_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, ["--out", str(tmp_path / "s"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("file,old,new,message", [
    ("study/cpu.yaml", "max_docs: 16", "max_doc: 16", "configs/study/quick.yaml: eval: Key 'max_doc' not in"),
    ("study/cpu.yaml", "[none, pi,", "[none, pie,", "Invalid value 'pie', expected one of [none, pi, ntk"),
    ("study/quick.yaml", "extrapolation_quick", "extrapolation_fast",
     "experiment=extrapolation_fast is not in configs/experiment/; choose from ['extension', 'extrapolation', "),
    ("study/quick.yaml", "seeds: [0]", "seed: [0]", "configs/study/quick.yaml: Key 'seed' not in 'Preset'"),
    ("run_study.yaml", "relative, t5]", "relative, t5, rotary]", "pos_order: ['rotary'] are not positional schemes"),
    ("run_study.yaml", "rope+linear:", "rope:", "variants: ['rope'] already name positional schemes"),
    ("study/generalization.yaml", "tasks: [copy,", "tasks: [lego,", "configs/study/generalization.yaml: tasks: "
     "['lego'] are not tasks; choose from ['copy', 'reverse', 'addition', 'sorting', 'parity', 'summation', "),
    ("study/generalization.yaml", "task_overrides: {reverse:", "task_overrides: {addition:",
     "configs/study/generalization.yaml: task_overrides: ['addition'] are not in this preset's tasks ['copy', "),
    ("study/generalization.yaml", "jobs: 2", "jobs: 0",
     "configs/study/generalization.yaml: jobs=0: run at least 1 training run at once"),
])  # fmt: skip
def test_a_bad_study_config_fails_in_one_line(tmp_path, monkeypatch, file, old, new, message):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    path = configs / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    monkeypatch.setattr(run_study, "CONFIGS", configs)
    with pytest.raises(ValueError) as e:
        run_study.load_study("generalization" if "generalization" in file else "quick")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_placeholders_are_filled_per_seed_and_training_length():
    study = run_study.load_study("cpu")
    assert study.seq_len == 128
    assert study.overrides("learned-32L", 0, None) == ["pos=learned", "pos.max_len=4096"]
    assert study.run_name("learned-32L", 1) == "pos=learned,pos.max_len=4096,seed=1"
    assert run_study.expand("a={base}/s{seed}/{0.5L}", seed=2, base=Path("/b"), seq_len=128) == "a=/b/s2/64"
    with pytest.raises(ValueError, match="is not a whole number"):
        run_study.expand("x={0.3L}", seed=0, base=None, seq_len=128)
    with pytest.raises(ValueError, match=r"names \{base\} but the preset sets no base study"):
        run_study.expand("x={base}", seed=0, base=None, seq_len=128)


def fake_base(base: Path, seeds) -> None:
    for seed in seeds:
        ck = base / "runs" / f"pos=rope,seed={seed}" / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "last.pt").write_bytes(b"")


def test_the_extension_preset_fine_tunes_the_base_rope_runs_and_scores_them_too(tmp_path, monkeypatch):
    base, out = tmp_path / "cpu", tmp_path / "ext"
    fake_base(base, [0, 1])
    rc, cmds = run_main(monkeypatch, ["--preset", "extension", "--base", str(base), "--out", str(out),
                                      "--seeds", "0,1", "--logger", "none"])  # fmt: skip
    assert rc == 0 and len(cmds) == 6 * 2 + 1
    pi = cmds[1]  # seed 0, rope+pi-ft
    assert pi[2:9] == ["experiment=extension", "pos=rope", f"trainer.init_from='{base}/runs/pos=rope,seed=0'",
                       "pos.scaling=pi", "pos.scaling_factor=4", "pos.original_len=128", "seed=0"]  # fmt: skip
    assert pi[-1] == f"hydra.run.dir='{out}/runs/variant=rope+pi-ft,seed=0'"
    assert cmds[6][4] == f"trainer.init_from='{base}/runs/pos=rope,seed=1'"  # seed-major
    evaluate = cmds[-1]
    assert evaluate[2] == f"ckpt=['{out}/runs','{base}/runs/pos=rope,seed=0','{base}/runs/pos=rope,seed=1']"
    assert "eval.lengths=[128,256,512,1024,2048,4096]" in evaluate
    assert "eval.rope_scaling=[none,pi,ntk,yarn,llama3]" in evaluate
    assert not any(a.startswith("eval.multipliers") for a in evaluate)


def test_the_extension_preset_without_its_base_study_fails_in_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    base = tmp_path / "cpu"
    fake_base(base, [0])
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, ["--preset", "extension", "--base", str(base), "--out", str(tmp_path / "ext"),
                               "--seeds", "0,1"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: the base study has no checkpoint at {base}/runs/pos=rope,seed=1 (1 missing); train it "
                        f"first: python scripts/run_study.py --out {base} --seeds 0,1")  # fmt: skip
    assert not (tmp_path / "ext").exists()


def test_the_generalization_preset_trains_every_scheme_on_every_task():
    study, out = run_study.load_study("generalization"), Path("/studies/gen")
    assert list(study.variants) == [v for v in STUDY_VARIANTS if v in SCHEMES]  # the registry's, none of the named
    assert study.preset.tasks == ["copy", "reverse", "sorting", "summation", "parity"] and study.preset.jobs == 2
    runs = run_study.train_runs(study, ["rope", "nope"], [0, 1], out, "none", [], ["copy", "parity"], threads=1)
    assert [name for name, _, _ in runs] == [
        f"task={t},pos={v},seed={s}" for s in (0, 1) for t in ("copy", "parity") for v in ("rope", "nope")]
    assert runs[1][2] == [
        PY, "train.py", "experiment=task", "pos=nope", "data.task=copy", "seed=0", "logger=none",
        "logger.group=gen-copy-nope", "logger.tags=[tasks,gen]", "logger.name=copy-nope-seed0",
        "trainer.progress=false", "trainer.threads=1", "hydra.run.dir='/studies/gen/runs/task=copy,pos=nope,seed=0'"]
    reverse = run_study.train_runs(study, ["nope"], [0], out, "none", [], ["reverse"])[0][2]
    assert reverse[4:6] == ["data.task=reverse", "trainer.max_steps=2000"]  # task_overrides: that task's runs only
    assert run_study.eval_command(study, out, "none", [0]) == [
        PY, "evaluate.py", "ckpt=['/studies/gen/runs']", "eval.progress=false", "eval.bf16=true",
        "eval.task_examples=200", "logger=none", "logger.tags=[tasks,gen]", "hydra.run.dir='/studies/gen/eval'"]


def test_jobs_run_at_once_each_with_its_own_log(tmp_path, monkeypatch):
    """--jobs 2: two training commands are in flight together (each waits until the other has started), each logs
    to <out>/logs/<run>.log, and the record keeps the runs' order."""
    both = threading.Barrier(2, timeout=10)
    logs = []

    def sh(cmd, log):
        logs.append(log)
        if cmd[1] == "train.py":
            both.wait()  # a BrokenBarrierError if the two never run at once
        return 0

    monkeypatch.setattr(run_study, "sh", sh)
    monkeypatch.setattr(run_study, "write_report", lambda out: None)
    out = tmp_path / "gen"
    monkeypatch.setattr(sys, "argv", ["run_study.py", "--preset", "generalization", "--out", str(out), "--variants",
                                      "rope", "--tasks", "copy,parity", "--seeds", "0", "--logger", "none"])
    assert run_study.main() == 0
    names = ["task=copy,pos=rope,seed=0", "task=parity,pos=rope,seed=0"]
    assert sorted(logs[:2]) == [out / "logs" / f"{n}.log" for n in names] and logs[2] == out / "study.log"
    record = json.loads((out / "study.json").read_text())
    assert [r["run"] for r in record["runs"]] == names and (record["tasks"], record["jobs"]) == (["copy", "parity"], 2)
