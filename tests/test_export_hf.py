"""Hugging Face export: every supported variant gives our logits far past the training length; the rest is refused.

Tiny random models in fp32, saved through the real checkpoint writer, exported, and read back with
``AutoModelForCausalLM.from_pretrained`` as a user would. Weights use a large init so attention is sharp and a
wrong mapping (a head order, a rotary pairing, a transposed Conv1D) moves the logits by far more than the
tolerance; ``test_the_logit_check_can_tell_the_layouts_apart`` shows it does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from roformer import hf_export  # noqa: E402
from roformer.checkpoint import model_from_checkpoint, save_checkpoint  # noqa: E402
from roformer.data.tokenizer import EOD_TOKEN, to_json, train_bpe  # noqa: E402
from roformer.files import to_plain, umask  # noqa: E402
from roformer.model import ModelConfig, TransformerLM  # noqa: E402
from roformer.positional import SCHEMES, PosConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 16  # the "training length" recorded in the checkpoints; logits are compared at 4x it
TOL = 1e-4

VARIANTS = {
    "rope_half": ({}, {"name": "rope"}),
    "rope_interleaved": ({}, {"name": "rope", "layout": "interleaved"}),
    "rope_fraction_0.5": ({}, {"name": "rope", "layout": "interleaved", "rotary_fraction": 0.5}),
    "rope_base_500": ({}, {"name": "rope", "base": 500.0}),
    "rope_pi": ({}, {"name": "rope", "scaling": "pi", "scaling_factor": 4.0, "original_len": SEQ_LEN}),
    "rope_ntk": ({}, {"name": "rope", "scaling": "ntk", "scaling_factor": 4.0, "original_len": SEQ_LEN}),
    "rope_dynamic_ntk": ({}, {"name": "rope", "scaling": "dynamic_ntk", "original_len": SEQ_LEN}),
    # head_dim 16 from L0 = 16: frequency 0 kept (wavelength 6.3 < 16 / 2), 1 on the ramp, the rest divided by 4
    "rope_llama3": ({}, {"name": "rope", "scaling": "llama3", "scaling_factor": 4.0, "original_len": SEQ_LEN,
                         "low_freq_factor": 0.5, "high_freq_factor": 2.0}),
    "rope_llama3_interleaved_fraction_0.5": ({}, {"name": "rope", "layout": "interleaved", "rotary_fraction": 0.5,
                                                  "base": 500.0, "scaling": "llama3", "scaling_factor": 2.5,
                                                  "original_len": SEQ_LEN}),
    "rope_abf": ({}, {"name": "rope", "base": 500000.0}),
    "rope_tanh_bias_untied": ({"activation": "gelu_tanh", "bias": True, "tie_embeddings": False},
                              {"name": "rope", "layout": "interleaved", "rotary_fraction": 0.5}),
    "learned": ({}, {"name": "learned", "max_len": 4 * SEQ_LEN}),
    "learned_tanh_bias_untied": ({"activation": "gelu_tanh", "bias": True, "tie_embeddings": False},
                                 {"name": "learned", "max_len": 4 * SEQ_LEN}),
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat and the dog ran fast " * 8, "a big red house on a green hill " * 8]
    return train_bpe(texts, 300, progress=False)


def make_ckpt(path: Path, tokenizer, model_kw: dict, pos_kw: dict, seed: int = 0) -> Path:
    """A checkpoint as training writes it (the parts export reads), of a tiny random model."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, d_model=32, init_std=0.3,
                      **model_kw)
    pos = PosConfig(**pos_kw)
    model = TransformerLM(cfg, pos)
    if cfg.bias:  # training moves the biases away from their zero init; so must the test
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.3)
    payload = {"model_cfg": to_plain(cfg), "pos_cfg": to_plain(pos), "tokenizer_json": to_json(tokenizer),
               "model": model.state_dict(), "train_cfg": {"trainer": {"seq_len": SEQ_LEN}}, "step": 1}
    return save_checkpoint(path, payload)


def max_logit_diff(ckpt: Path, out: Path, length: int = 4 * SEQ_LEN) -> float:
    from transformers import AutoModelForCausalLM

    ours = model_from_checkpoint(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(ids)[0] - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_gives_our_logits_far_past_the_training_length(tmp_path, tokenizer, variant):
    ckpt = make_ckpt(tmp_path / "run" / "last.pt", tokenizer, *VARIANTS[variant])
    out = hf_export.export(ckpt, tmp_path / "hf")
    for length in (4 * SEQ_LEN, 5 * SEQ_LEN // 2):  # two lengths: dynamic NTK picks its base from the length
        diff = max_logit_diff(ckpt, out, length)
        print(f"{variant}: max |logit difference| at length {length}: {diff:.2e}")
        assert diff < TOL
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folder left
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # as mkdir would make it, not mkdtemp's 0700


def test_the_logit_check_can_tell_the_layouts_apart(tmp_path, tokenizer):
    """The same weights with the other pairing give other logits: the check above would catch a wrong layout."""
    ckpt = make_ckpt(tmp_path / "a.pt", tokenizer, {}, {"name": "rope", "layout": "interleaved"})
    out = hf_export.export(make_ckpt(tmp_path / "b.pt", tokenizer, {}, {"name": "rope"}), tmp_path / "hf")
    assert max_logit_diff(ckpt, out) > 100 * TOL


def test_config_and_tokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    out = hf_export.export(make_ckpt(tmp_path / "c.pt", tokenizer, {}, VARIANTS["rope_fraction_0.5"][1]),
                           tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    eod = tokenizer.token_to_id(EOD_TOKEN)
    assert config["architectures"] == ["GPTNeoXForCausalLM"] and config["use_parallel_residual"] is False
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5 and config["layer_norm_eps"] == 1e-5
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eod
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == EOD_TOKEN and hf_tok.eos_token_id == eod
    text = "the cat sat on a green hill, héllo"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tok.decode(tokenizer.encode(text).ids) == text


def test_llama3_config(tmp_path, tokenizer):
    """The llama3 scaling is Hugging Face's rope_type llama3 with our settings, beyond its original length."""
    out = hf_export.export(make_ckpt(tmp_path / "c.pt", tokenizer, *VARIANTS["rope_llama3"]), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    rope = {k: config["rope_parameters"][k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings", "rope_theta")}
    assert rope == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 0.5, "high_freq_factor": 2.0,
                    "original_max_position_embeddings": SEQ_LEN, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 4 * SEQ_LEN


@pytest.mark.parametrize("variant", ["rope_interleaved", "learned"])
def test_pipeline_and_greedy_decoding_match_ours(tmp_path, tokenizer, variant):
    from transformers import AutoModelForCausalLM, pipeline

    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, *VARIANTS[variant])
    out = hf_export.export(ckpt, tmp_path / "hf")
    generated = pipeline("text-generation", model=str(out))("the cat", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("the cat")

    ours, eod = model_from_checkpoint(ckpt), tokenizer.token_to_id(EOD_TOKEN)
    prompt, n_new = tokenizer.encode("the dog ran").ids, 12
    expected = list(prompt)  # greedy by full forwards: an independent reference for HF's cached decoding
    with torch.no_grad():
        while len(expected) < len(prompt) + n_new and (len(expected) == len(prompt) or expected[-1] != eod):
            expected.append(int(ours(torch.tensor([expected]))[0][0, -1].argmax()))
        theirs = AutoModelForCausalLM.from_pretrained(out).generate(
            torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0].tolist()
    assert theirs == expected


def test_greedy_decoding_matches_roformer_generation(tmp_path, tokenizer):
    generation = pytest.importorskip("roformer.generation")
    from transformers import AutoModelForCausalLM

    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, *VARIANTS["rope_interleaved"])
    out = hf_export.export(ckpt, tmp_path / "hf")
    prompt, eod = tokenizer.encode("the dog ran").ids, tokenizer.token_to_id(EOD_TOKEN)
    with torch.no_grad():
        ours = list(generation.generate(model_from_checkpoint(ckpt), prompt, max_new_tokens=12, temperature=0.0,
                                        stop_id=eod))
        theirs = AutoModelForCausalLM.from_pretrained(out).generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
    assert theirs == prompt + ours


REFUSED = {
    "sinusoidal": ({}, {"name": "sinusoidal"}, "pos=sinusoidal has no Hugging Face equivalent; export supports "
                                               "pos=learned and pos=rope"),
    "alibi": ({}, {"name": "alibi"}, "pos=alibi has no Hugging Face equivalent"),
    "relative": ({}, {"name": "relative"}, "pos=relative has no Hugging Face equivalent"),
    "t5": ({}, {"name": "t5"}, "pos=t5 has no Hugging Face equivalent"),
    "nope": ({}, {"name": "nope"}, "pos=nope has no Hugging Face equivalent"),
    "linear_attention": ({"attention": "linear"}, {"name": "rope"}, "model.attention=linear has no Hugging Face"),
    "yarn": ({}, {"name": "rope", "scaling": "yarn", "scaling_factor": 4.0, "original_len": SEQ_LEN},
             "pos.scaling=yarn cannot be exported: Hugging Face's YaRN ramps"),
    "rotate_values": ({}, {"name": "rope", "rotate_values": True}, "pos.rotate_values=true"),
    "randomized_rope": ({}, {"name": "rope", "randomized_max": 256},
                        "pos.randomized_max=256 (randomized positions: Hugging Face numbers the positions 0 .. T-1) "
                        "cannot be exported: GPTNeoXForCausalLM has no equivalent; only checkpoints trained with "
                        "pos.randomized_max=0 can be exported"),
    "randomized_learned": ({}, {"name": "learned", "max_len": 64, "randomized_max": 64},
                           "pos.randomized_max=64 (randomized positions: Hugging Face numbers the positions 0 .. T-1) "
                           "cannot be exported: GPT2LMHeadModel has no equivalent"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_is_refused_in_one_line_and_nothing_is_written(tmp_path, tokenizer, case):
    model_kw, pos_kw, message = REFUSED[case]
    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, model_kw, pos_kw)
    with pytest.raises(hf_export.ExportError, match="^" + re.escape(message)) as e:
        hf_export.export(ckpt, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("name", sorted(set(SCHEMES) - set(hf_export.EXPORTERS)))
def test_every_scheme_without_an_exporter_is_refused(tmp_path, tokenizer, name):
    """Asked of the registry: a scheme added later is refused until it has an exporter."""
    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, {}, {"name": name})
    with pytest.raises(hf_export.ExportError) as e:
        hf_export.export(ckpt, tmp_path / "hf")
    assert str(e.value) == (f"pos={name} has no Hugging Face equivalent; export supports pos="
                            f"{' and pos='.join(sorted(hf_export.EXPORTERS))}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("kind, rope_type", [("pi", "linear"), ("llama3", "llama3")])
def test_scaling_asked_for_at_export(tmp_path, tokenizer, kind, rope_type):
    """rope_scaling= at export time: the same logits as our model evaluated with that scaling (zero-shot)."""
    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, {}, {"name": "rope"})
    scaled = hf_export.with_scaling(torch.load(ckpt, weights_only=True), kind, 4.0)
    assert scaled["pos_cfg"]["original_len"] == SEQ_LEN
    out = hf_export.export(scaled, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == rope_type
    ours = model_from_checkpoint(ckpt)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, ours.cfg.vocab_size, (1, 4 * SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), ours.scaled_positions(kind, 4.0, SEQ_LEN):
        diff = (ours(ids)[0] - AutoModelForCausalLM.from_pretrained(out)(ids).logits).abs().max().item()
    assert diff < TOL
    learned = make_ckpt(tmp_path / "l.pt", tokenizer, {}, {"name": "learned", "max_len": 64})
    with pytest.raises(hf_export.ExportError, match="rope_scaling=pi applies to pos=rope only"):
        hf_export.with_scaling(torch.load(learned, weights_only=True), "pi", 2.0)


def test_non_empty_out_is_refused_and_overwrite_replaces_it(tmp_path, tokenizer):
    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, {}, {"name": "rope"})
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(hf_export.ExportError, match=f"out={out} is a non-empty folder; .* overwrite=true"):
        hf_export.export(ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    hf_export.export(ckpt, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "hf"]  # the old folder is gone, no temp left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (hf_export.export(ckpt, empty) / "config.json").is_file()  # an empty folder is fine without overwrite


def test_a_failed_export_leaves_nothing_and_keeps_the_old_folder(tmp_path, tokenizer, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    ckpt = make_ckpt(tmp_path / "c.pt", tokenizer, {}, {"name": "rope"})
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fail)
    for target, overwrite in ((tmp_path / "new", False), (out, True)):
        with pytest.raises(OSError):
            hf_export.export(ckpt, target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "hf"]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # real CLI processes, 13-27 s: CI's slow step runs it
def test_cli_exports_and_refuses_with_one_line(tmp_path, tokenizer):
    make_ckpt(tmp_path / "run" / "checkpoints" / "last.pt", tokenizer, {}, {"name": "rope"})
    make_ckpt(tmp_path / "alibi.pt", tokenizer, {}, {"name": "alibi"})
    (tmp_path / "foreign.pt").write_bytes(os.urandom(64))
    ok = run_cli("ckpt=run", "out=hf", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (
        (("ckpt=run", "out=hf"), "is a non-empty folder; choose another out or add overwrite=true"),
        (("ckpt=alibi.pt", "out=hf2"), "pos=alibi has no Hugging Face equivalent; export supports pos=learned"),
        (("ckpt=missing.pt", "out=hf2"), "checkpoint missing.pt does not exist; give ckpt="),
        (("ckpt=foreign.pt", "out=hf2"), "foreign.pt is not a"),
        (("ckpt=run", "out=hf2", "rope_scaling=yarn", "scaling_factor=2"), "pos.scaling=yarn cannot be exported"),
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a Hydra folder
