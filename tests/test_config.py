"""The Hydra configs compose, and bad input is refused before any work with a message naming the key."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, compose, tiny_config
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from roformer.config import to_config
from roformer.data.tasks import TASK_NAMES
from roformer.positional import SCHEMES
from roformer.runtime import Precision
from roformer.train_config import TrainConfig

GROUPS = ("model", "pos", "data", "optim", "logger", "experiment", "debug")
# options that need a value the YAML cannot know
REQUIRED = {("data", "text_files"): ["data.train_files=[corpus.txt]"],
            ("data", "hub"): ["data.hub_path=roneneldan/TinyStories"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_into_a_valid_config(group, option):
    cfg = to_config(compose(f"{group}={option}", *REQUIRED.get((group, option), [])))
    assert isinstance(cfg, TrainConfig)
    if group in ("pos", "data"):  # the option name is the registry name carried by checkpoints and dashboards
        assert getattr(cfg, group).name == option
    assert cfg.model.vocab_size == cfg.data.vocab_size  # the model takes the data's vocabulary


def test_groups_have_the_options_the_cli_contract_promises():
    assert set(options("pos")) == set(SCHEMES)
    assert {"small", "gpt2_small", "tiny"} <= set(options("model"))
    assert {"wandb", "none"} == set(options("logger"))
    assert "fast" in options("debug")
    assert options("experiment")


def test_data_task_brings_its_tiny_model_and_schedule_and_keys_still_override_them():
    task = to_config(compose("data=task", "data.task=reverse"))
    assert (task.model.n_layer, task.model.n_head, task.model.d_model) == (2, 4, 128)
    assert (task.optim.lr, task.optim.warmup_steps) == (1e-3, 100)
    assert (task.trainer.max_steps, task.trainer.batch_size, task.trainer.threads) == (1000, 64, 1)
    assert task.logger.tags == ["task"]
    assert to_config(compose("experiment=task", "data.task=reverse")) == task  # the study's name for the same run
    tuned = to_config(compose("data=task", "model.d_model=256", "optim.lr=3e-3", "trainer.max_steps=7"))
    assert (tuned.model.d_model, tuned.optim.lr, tuned.trainer.max_steps) == (256, 3e-3, 7)
    # the steps are each task's (Task.default_steps): recall needs three times the others'
    steps = {t: to_config(compose("data=task", f"data.task={t}")).trainer.max_steps for t in TASK_NAMES}
    assert steps == {t: 3000 if t == "associative_recall" else 1000 for t in TASK_NAMES}
    recall = to_config(compose("data=task", "data.task=associative_recall", "trainer.max_steps=9"))
    assert recall.trainer.max_steps == 9
    corpus, small = to_config(compose()), OmegaConf.load(CONFIGS / "model" / "small.yaml")
    assert (corpus.model.n_layer, corpus.model.d_model) == (small.n_layer, small.d_model)  # other data: no preset
    assert corpus.optim.lr != task.optim.lr and corpus.trainer.max_steps != task.trainer.max_steps


def _has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_submitit(),
                    reason="hydra-submitit-launcher not installed (pip install -e '.[slurm]')")
def test_slurm_launcher_composes():
    cfg = compose("hydra/launcher=slurm", return_hydra_config=True)
    assert cfg.hydra.launcher.timeout_min > 0


def test_defaults_are_the_cpu_reference_run():
    cfg = to_config(compose())
    assert (cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head) == (8192, 256, 4, 4)
    assert (cfg.trainer.seq_len, cfg.trainer.batch_size, cfg.trainer.grad_accum) == (256, 16, 1)
    assert cfg.pos.name == "rope" and cfg.data.name == "wikitext2"
    assert cfg.trainer.precision == Precision.auto and cfg.logger.kind.value == "wandb"


def test_sweep_folders_are_named_by_overrides():
    cfg = compose("pos=alibi", "seed=1", "trainer.resume=auto", return_hydra_config=True)
    assert cfg.hydra.sweep.subdir == "pos=alibi,seed=1"  # trainer.resume stays out so resume=auto finds it


def test_pos_sweep_experiment_sweeps_every_scheme_and_three_seeds():
    """pos: glob(*) is every option of configs/pos/ (the registry: test_positional.py), as the sweeper expands it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS), job_name="test"):
        cfg = hydra_compose("train", overrides=["experiment=pos_sweep"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().hydra.config_loader)
        params = parser.parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
        jobs = BasicSweeper.split_arguments(params, None)[0]
    assert sorted(jobs) == sorted([f"pos={p}", f"seed={s}"] for p in SCHEMES for s in (0, 1, 2))


@pytest.mark.parametrize("override,match", [
    ("trainer.max_stepz=10", "max_stepz"),  # unknown key
    ("pos=rotary", "rotary"),  # unknown group option
    ("trainer.max_steps=ten", "max_steps"),  # wrong type
    ("trainer.precision=fp8", "fp8"),  # not an allowed value
    ("model.attention=sparse", "sparse"),
    ("logger.mode=sometimes", "sometimes"),
])
def test_bad_overrides_are_rejected_while_composing(override, match):
    with pytest.raises((ConfigCompositionException, HydraException, OmegaConfBaseException)) as e:
        compose(override)
    text = str(e.value) + str(e.value.__cause__ or "")
    assert match in text


def test_enum_errors_list_the_allowed_values():
    with pytest.raises(Exception) as e:
        compose("trainer.precision=fp8")
    text = str(e.value) + str(e.value.__cause__ or "")
    assert all(v in text for v in ("fp32", "bf16", "fp16", "auto"))


@pytest.mark.parametrize("overrides,match", [
    (["optim.lr=-0.001"], "optim.lr=-0.001 must be positive"),
    (["optim.lr=0"], "optim.lr=0.0 must be positive"),
    (["pos=learned", "pos.max_len=128", "trainer.seq_len=256"], r"trainer.seq_len=256 .*pos.max_len=128"),
    (["trainer.resume=/no/such/run"], "trainer.resume=/no/such/run: no such checkpoint"),
    (["trainer.precision=fp16", "trainer.device=cpu"], "fp16 needs CUDA"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 must be a positive integer"),
    (["model.vocab_size=1000"], "model.vocab_size=1000 is smaller than data.vocab_size=8192"),
    (["model.d_model=100", "model.n_head=3"], "not divisible"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["trainer.threads=-1"], "trainer.threads=-1 must be >= 0"),
    (["trainer.compile=maybe"], "trainer.compile='maybe' must be auto, true or false"),
    (["model.n_head=4", "model.d_model=68"], r"1.0 \* 17 = 17.0 dimensions, which must be a positive even integer "
                                             r"\(head_dim = model.d_model / model.n_head = 68 / 4\); change "
                                             r"pos.rotary_fraction, model.n_head or model.d_model"),
    (["pos.rotary_fraction=0.3"], r"0.3 \* 32 = 9.6 dimensions"),  # model=tiny: head_dim 64 / 2
    (["model.attention=linear", "pos=alibi"], "model.attention=linear cannot use pos=alibi"),
    (["trainer.resume_override=[seed,trainer.max_steps]"], "trainer.resume_override names trainer.max_steps, which "
                                                           "is not among the settings that define a run"),
    (["trainer.resume_override=[optim.lr,optim.decay]"], r"names optim.decay, which is not among the settings that "
                                                         r"define a run \(.*, optim.\*\)"),
])
def test_cross_field_and_value_checks_name_the_keys(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(*overrides)


@pytest.mark.parametrize("value,expected", [
    ("true", "true"), ("True", "true"), ("on", "true"), ("false", "false"), ("off", "false"), ("auto", "auto"),
])
def test_compile_setting_accepts_yaml_booleans_and_words(value, expected):
    assert tiny_config(f"trainer.compile={value}").trainer.compile == expected


def test_cli_prints_one_line_for_our_errors_and_exits_2_for_a_bad_value(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"hydra.run.dir={tmp_path}/run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # a usage error: refused before any work
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: optim.lr=-1.0 must be positive (e.g. optim.lr=1e-3)"]
    assert not (tmp_path / "run").exists()  # the folder Hydra made for it is gone


def test_cli_rejects_an_unknown_key_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "trainer.max_stepz=5", f"hydra.run.dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2  # Hydra's composition error: a usage error
    assert "max_stepz" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_refuses_an_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={blocker}/run"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: output folder {blocker}/run cannot be created (not a folder in {blocker}); "
        "choose another with hydra.run.dir=..."]


# ----------------------------------------------------------------------------------------------------------
# exit codes: 2 for usage (before any work), 1 for a failure while running; no run folder left behind for nothing

ROTARY_17 = ("error: RoPE rotates pos.rotary_fraction * head_dim = 1.0 * 17 = 17.0 dimensions, which must be a "
             "positive even integer (head_dim = model.d_model / model.n_head = 68 / 4); change pos.rotary_fraction, "
             "model.n_head or model.d_model")
NOWHERE = ["data=text_files", "data.train_files=[/nowhere/doc*.txt]"]


def _cli(script: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, code, last_line", [
    (["trainer.max_steps=ten"], 2, "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."),
    (["trainer.resume_override=[trainer.lr]"], 2, None),
    # the model/positional check runs when the config is made: the data that points nowhere is never looked at
    (["model.n_head=4", "model.d_model=68", *NOWHERE], 2, ROTARY_17),
    (NOWHERE, 1, "error: data.train_files: '/nowhere/doc*.txt' matches no file"),
])
def test_train_py_exits_2_for_usage_1_at_run_time_and_leaves_no_run_folder(args, code, last_line, tmp_path):
    r = _cli("train.py", *args, f"hydra.run.dir={tmp_path}/new/run")
    assert r.returncode == code and "Traceback" not in r.stderr
    if last_line is not None:
        assert r.stderr.strip().splitlines()[-1] == last_line
    assert not (tmp_path / "new").exists()  # the run folder Hydra made, and the parent made for it, are gone


def test_a_failed_call_with_the_default_run_folder_leaves_no_outputs_folder(tmp_path):
    r = _cli("train.py", "trainer.max_steps=-1", cwd=tmp_path)  # outputs/<date>/<time> under the working folder
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: trainer.max_steps=-1 must be a positive integer"]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_call_leaves_an_existing_run_folder_as_it_was(tmp_path):
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes/todo.txt").write_text("keep me\n")
    (run / "train.log").write_text("an earlier run's log\n")
    r = _cli("train.py", *NOWHERE, f"hydra.run.dir={run}")
    assert r.returncode == 1
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["notes", "notes/todo.txt", "train.log"]
    assert (run / "train.log").read_text() == "an earlier run's log\n"  # Hydra appended to it: cut back


@pytest.mark.parametrize("args, code, last_line", [
    (["data.nope=1"], 2, "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."),
    (["data.name=nope"], 2,
     "error: data.name='nope' is not one of: wikitext2, wikitext103, sotu, hub, text_files, task"),
    (["data=text_files"], 2, "error: data.train_files is required for data=text_files, e.g. "
                             "data.train_files=[corpus.txt]"),
    (NOWHERE, 1, "error: data.train_files: '/nowhere/doc*.txt' matches no file"),
])
def test_prepare_data_exits_2_for_usage_and_1_at_run_time(args, code, last_line, tmp_path):
    r = _cli("scripts/prepare_data.py", *args, f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert r.returncode == code and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == last_line
