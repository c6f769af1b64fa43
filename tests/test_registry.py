"""The positional registry: a scheme declares the options it reads and the rest is refused; has_bias and
supports_scaling follow from its hooks, linear attention from a declaration; and every list of schemes (help
pages, the sweep preset, the study's variants, the tests that cover every scheme) derives from the registry, so a
new scheme is its module, its configs/pos/<name>.yaml and its tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from enum import Enum

import pytest
import torch
from conftest import CONFIGS, REPO, compose, tiny_config
from omegaconf import OmegaConf

import roformer.config as hydra_face
import roformer.positional.base as base
from roformer.model import ModelConfig, TransformerLM, check_positional
from roformer.positional import DEFAULTS, SCHEMES, PosConfig, PositionalScheme, build_positional, readers, register

sys.path.insert(0, str(REPO / "scripts"))
import run_study  # noqa: E402

ORIGINAL = ("rope", "sinusoidal", "learned", "alibi", "nope", "relative", "t5")


def other_value(key: str):
    """A value of pos.KEY other than its default, of the same type."""
    v = DEFAULTS[key]
    if isinstance(v, Enum):
        return next(m for m in type(v) if m != v)
    return (not v) if isinstance(v, bool) else v + 1


# ---- the options a scheme reads


def test_what_each_scheme_reads():
    reads = {n: sorted(SCHEMES[n].options) for n in ORIGINAL}
    assert reads == {
        "rope": ["base", "high_freq_factor", "layout", "low_freq_factor", "original_len", "randomized_max",
                 "rotary_fraction", "rotate_values", "scaling", "scaling_factor"],
        "sinusoidal": ["base", "randomized_max", "scale_embeddings"], "learned": ["max_len", "randomized_max"],
        "alibi": ["randomized_max"], "nope": [], "relative": ["clip", "randomized_max"],
        "t5": ["max_distance", "num_buckets", "randomized_max"],
    }
    assert all(readers(k) for k in DEFAULTS)  # every option is read by some scheme


@pytest.mark.parametrize("name, key", [(n, k) for n in sorted(SCHEMES) for k in DEFAULTS
                                       if k not in SCHEMES[n].options])
def test_an_option_the_scheme_does_not_read_is_refused_in_one_line(name, key):
    cfg = PosConfig(name=name)
    setattr(cfg, key, other_value(key))  # past __post_init__: only the refusal is under test
    assert cfg.unread() == [key]
    with pytest.raises(ValueError) as e:
        cfg.check_options()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"pos.{key}=") and f": pos={name} does not read it (" in msg
    assert msg.endswith("; drop it") and f"read by {' and '.join(readers(key))}" in msg


def test_the_refusal_names_what_the_scheme_reads_and_comes_before_any_work(no_data):
    with pytest.raises(ValueError, match=r"^pos.rotary_fraction=0.5: pos=alibi does not read it \(alibi reads "
                                         r"pos.randomized_max; pos.rotary_fraction is read by rope and xpos\); "
                                         r"drop it$"):
        tiny_config("pos=alibi", "pos.rotary_fraction=0.5")
    with pytest.raises(ValueError, match=r"^pos.cope_max=8: pos=nope does not read it \(nope reads no pos.\* option "
                                         r"besides pos.name; pos.cope_max is read by cope\); drop it$"):
        tiny_config("pos=nope", "pos.cope_max=8")
    with pytest.raises(ValueError, match=r"^pos.max_len=64, pos.clip=3: pos=rope does not read them \(rope reads "
                                         r"pos.base, .*; pos.max_len is read by learned; pos.clip is "
                                         r"read by relative\); drop them$"):
        tiny_config("pos.max_len=64", "pos.clip=3")
    # the default of an option is no option given: a scheme's YAML need not list what it does not read
    assert tiny_config("pos=alibi", "pos.rotary_fraction=1.0").pos.name == "alibi"
    # a checkpoint's config keeps every key: building a model from one is not refused
    TransformerLM(ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16), PosConfig(name="alibi", max_len=64))


def test_the_cli_refuses_an_option_the_scheme_does_not_read(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "debug=fast", "pos=alibi", "pos.rotary_fraction=0.5",
                        "data=text_files", "data.train_files=[/nowhere/doc*.txt]", f"hydra.run.dir={tmp_path}/run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: pos.rotary_fraction=0.5: pos=alibi does not read it (alibi reads pos.randomized_max; "
        "pos.rotary_fraction is read by rope and xpos); drop it"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_presets_give_each_scheme_only_what_it_reads(experiment):
    """A preset every scheme trains with sets a scheme's option as ${if_read:KEY,VALUE} (learned's table as long as
    training): the schemes that do not read it keep the default."""
    for name in sorted(SCHEMES):
        pos = OmegaConf.to_object(compose(f"experiment={experiment}", f"pos={name}").pos)
        assert pos.unread() == [], (experiment, name)
    if experiment == "extrapolation":
        assert OmegaConf.to_object(compose("experiment=extrapolation", "pos=learned").pos).max_len == 128
        assert OmegaConf.to_object(compose("experiment=extrapolation", "pos=rope").pos).max_len == DEFAULTS["max_len"]


def test_if_read_on_the_command_line_and_the_overrides_as_typed():
    """``pos.max_len=${if_read:max_len,32}`` gives learned its table and leaves the others alone; Hydra's list of
    overrides keeps it as typed (resolving it there would fail: that list is no pos node)."""
    override = "pos.max_len=${if_read:max_len,32}"
    assert tiny_config("pos=learned", override).pos.max_len == 32
    assert tiny_config("pos=rope", override).pos.max_len == DEFAULTS["max_len"]
    cfg = compose("pos=rope", override, return_hydra_config=True)
    assert hydra_face.typed(cfg.hydra.overrides.task) == ["pos=rope", override]


# ---- what follows from the hooks, and what must be declared


def test_has_bias_and_supports_scaling_follow_from_the_hooks():
    for name, cls in SCHEMES.items():
        assert cls.has_bias == (cls.bias is not PositionalScheme.bias), name
        assert cls.supports_scaling == (cls.with_scaling is not PositionalScheme.with_scaling), name
        assert not (cls.has_bias and cls.supports_linear), name
    assert {n for n in ORIGINAL if SCHEMES[n].has_bias} == {"alibi", "relative", "t5"}
    assert {n for n in ORIGINAL if SCHEMES[n].supports_linear} == {"rope", "nope", "sinusoidal", "learned"}


def test_a_scheme_class_that_contradicts_itself_is_refused_when_defined():
    with pytest.raises(TypeError, match="sets has_bias; it follows from overriding bias"):
        type("HandSet", (PositionalScheme,), {"has_bias": True})
    with pytest.raises(TypeError, match="cannot declare supports_linear"):
        type("BiasLinear", (PositionalScheme,), {"bias": lambda self, q, ctx, layer, q_idx: None,
                                                 "supports_linear": True})
    with pytest.raises(TypeError, match=r"options names \['rotary_dims'\], which are not PosConfig fields"):
        type("Typo", (PositionalScheme,), {"options": {"rotary_dims"}})
    with pytest.raises(TypeError, match="'rope' is registered twice"):
        register("rope")(type("Rope2", (PositionalScheme,), {}))


# ---- a throwaway scheme: what a new module would add


class ZeroBias(PositionalScheme):
    """A bias scheme that forgets nothing: it overrides bias(), so it has one, and it did not declare linear."""

    options = frozenset({"clip"})

    def bias(self, q, k, ctx, layer, q_idx):
        return torch.zeros(1, 1, q.shape[2], ctx.k_pos.numel())


class Plain(PositionalScheme):
    """No hook at all, and linear attention not declared."""


@pytest.fixture
def new_schemes(monkeypatch):
    """ZeroBias and Plain registered as zero_bias and plain, for this test only."""
    monkeypatch.setattr(base, "SCHEMES", dict(SCHEMES))
    for module in (hydra_face, run_study):
        monkeypatch.setattr(module, "SCHEMES", base.SCHEMES)
    monkeypatch.setattr("roformer.model.SCHEMES", base.SCHEMES)
    register("zero_bias")(ZeroBias)
    register("plain")(Plain)
    yield base.SCHEMES


def test_a_registered_scheme_appears_in_every_list_derived_from_the_registry(new_schemes):
    assert ZeroBias.has_bias and not ZeroBias.supports_linear and not Plain.has_bias
    assert {"zero_bias", "plain"} <= set(hydra_face.schemes().split(", "))  # --help: ${schemes:}
    assert hydra_face.reads("zero_bias") == "pos.clip" and readers("clip") == ["relative", "zero_bias"]
    variants = run_study.load_study("cpu").variants  # after pos_order, by name: nothing to list anywhere
    assert variants["plain"] == ["pos=plain"] and variants["zero_bias"] == ["pos=zero_bias"]
    later = [v for v in variants if v in new_schemes and v not in ORIGINAL]  # after pos_order's, by name
    assert later == sorted(later) and {"plain", "zero_bias"} <= set(later)
    assert list(variants).index(later[0]) == len(ORIGINAL)
    cfg = PosConfig(name="zero_bias", clip=3)
    cfg.check_options()
    with pytest.raises(ValueError, match=r"^pos.base=20.0: pos=zero_bias does not read it \(zero_bias reads pos.clip;"):
        PosConfig(name="zero_bias", base=20.0).check_options()
    model = TransformerLM(ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, bias_block=3), cfg)
    assert model(torch.randint(0, 8, (1, 7)))[0].shape == (1, 7, 8)  # through the additive-bias path
    assert isinstance(build_positional(PosConfig(name="plain"), d_model=16, n_head=2, n_layer=1), Plain)


def test_linear_attention_is_refused_unless_the_scheme_declares_it(new_schemes):
    linear = ModelConfig(vocab_size=8, n_layer=1, n_head=2, d_model=16, attention="linear")
    with pytest.raises(ValueError, match=r"cannot use pos=zero_bias \(it adds to an attention matrix that linear "
                                         r"attention never forms\); use one of learned, nope, rope, sinusoidal$"):
        check_positional(linear, PosConfig(name="zero_bias"))
    with pytest.raises(ValueError, match=r"cannot use pos=plain \(its class does not declare supports_linear"):
        check_positional(linear, PosConfig(name="plain"))
    assert hydra_face.schemes("linear") == "learned, nope, rope, sinusoidal"


def test_a_new_module_in_the_package_is_all_it_takes_to_register(tmp_path):
    """roformer/positional/__init__.py imports every module of the package: a copy of the package with one more
    module has one more scheme, in the registry and on the help page, with no other file changed."""
    pkg = tmp_path / "roformer"
    subprocess.run(["cp", "-r", str(REPO / "roformer"), str(pkg)], check=True)
    (pkg / "positional" / "toy.py").write_text(textwrap.dedent('''
        from roformer.positional.base import PositionalScheme, register


        @register("toy")
        class Toy(PositionalScheme):
            """Reads pos.base, adds nothing."""

            options = frozenset({"base"})
            supports_linear = True
    '''))
    code = ("import roformer.config as c, roformer.positional as p; "
            "print(p.SCHEMES['toy'].__module__, 'toy' in c.schemes().split(', '), 'toy' in c.schemes('linear'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["roformer.positional.toy", "True", "True"]


# ---- the lists that are YAML (the sweep preset: test_config.py; the pos options: test_positional.py)


def test_the_study_order_names_only_registered_schemes():
    order = OmegaConf.load(CONFIGS / "run_study.yaml").pos_order
    assert set(order) <= set(SCHEMES) and len(set(order)) == len(order)
