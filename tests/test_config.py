"""The Hydra configs compose, and bad input is refused before any work with a message naming the key."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import CONFIGS, REPO, compose, tiny_config
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException

from roformer.config import to_config
from roformer.positional import SCHEMES
from roformer.runtime import Precision
from roformer.training import TrainConfig

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
    cfg = compose("experiment=pos_sweep", return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params.pos.split(",")) == set(SCHEMES) and params.seed == "0,1,2"


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
])
def test_cross_field_and_value_checks_name_the_keys(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(*overrides)


@pytest.mark.parametrize("value,expected", [
    ("true", "true"), ("True", "true"), ("on", "true"), ("false", "false"), ("off", "false"), ("auto", "auto"),
])
def test_compile_setting_accepts_yaml_booleans_and_words(value, expected):
    assert tiny_config(f"trainer.compile={value}").trainer.compile == expected


def test_cli_prints_one_line_for_our_errors_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "optim.lr=-1", f"hydra.run.dir={tmp_path}/run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: optim.lr=-1.0 must be positive (e.g. optim.lr=1e-3)"


def test_cli_rejects_an_unknown_key_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "trainer.max_stepz=5", f"hydra.run.dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
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
