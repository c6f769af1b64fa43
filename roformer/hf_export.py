"""Export a trained checkpoint as a Hugging Face ``transformers`` model folder.

    python scripts/export_hf.py ckpt=RUN out=DIR [overwrite=true] [push_to_hub=USER/REPO]

Each exportable scheme maps to an architecture whose forward is ours exactly (same logits up to float rounding):

* ``rope`` -> ``GPTNeoXForCausalLM`` with ``use_parallel_residual=False`` (our sequential pre-norm block).
  GPT-NeoX's fused qkv is laid out per head, ``(H, 3, D)``, ours ``(3, H, D)``: the rows are regrouped. NeoX
  pairs dimension i with i + r/2 (our ``half`` layout); the ``interleaved`` (RoFormer) layout is converted by
  permuting the rows of the query and key projections within the rotated part of each head, pair (2j, 2j+1)
  -> (j, j + r/2); scores are unchanged because q and k get the same permutation (tests/test_positional.py's
  ``test_layouts_equal_up_to_a_permutation``). ``rotary_fraction`` -> ``partial_rotary_factor``, ``base`` ->
  ``rope_theta``. Scaling: ``pi`` -> rope_type ``linear`` (inv_freq / s); ``ntk`` (static) -> ``rope_theta`` =
  base * s^(r/(r-2)), which is all it changes; ``dynamic_ntk`` -> rope_type ``dynamic`` with factor 1 and
  ``max_position_embeddings`` = the original length, where HF's base * (f L / L0 - (f - 1))^(r/(r-2)) is ours,
  base * max(1, L / L0)^(r/(r-2)) (one caveat: HF keeps the largest length's base until an input is shorter
  than L0 again, so a long input changes the next shorter ones; ours recomputes per input); ``llama3`` -> rope_type
  ``llama3`` with our factor, ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings`` =
  ``pos.original_len`` (the same formula; HF's rope types are shared by its models, so GPT-NeoX computes it as
  Llama does). ``yarn`` is refused: HF ramps by dimension index, ours by rotations (as the paper does). A larger
  ``pos.base`` (ABF) is only ``rope_theta``.
* ``learned`` -> ``GPT2LMHeadModel`` (``n_positions`` = the table size; Conv1D weights are our Linear's transposed).

Everything else is refused in one line before any work: a scheme without an entry in :data:`EXPORTERS` (xPos,
KERPLE, FIRE, CoPE, ALiBi, ...), a scaling above, and any ``pos.*`` option the scheme reads but its exporter does
not map (:attr:`Exporter.maps`) set to other than its default: ``rotate_values`` and randomized positions
(``randomized_max``: Hugging Face numbers the positions 0 .. T-1), and whatever option a scheme gains later.

Biases we do not have are exported as zeros; GELU is ``gelu`` (exact, erf) or ``gelu_pytorch_tanh`` (the same
``F.gelu(approximate="tanh")`` we call); LayerNorm eps is torch's 1e-5; attention scale 1/sqrt(head_dim) in both.
The folder holds safetensors weights, config.json, generation_config.json (eos = our end-of-document id) and the
tokenizer as a ``PreTrainedTokenizerFast``. It is written into a temporary folder beside ``out`` and renamed into
place, so a failed export leaves nothing. ``transformers`` is imported inside the functions that need it: it is
an optional heavy dependency (the dev extra), and training never needs it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from roformer.checkpoint import CheckpointError, configs_from_checkpoint, load_checkpoint, model_from_checkpoint
from roformer.data.tokenizer import EOD_TOKEN, from_json
from roformer.files import fsync_dir, one_line, umask
from roformer.model import Activation, AttentionKind, ModelConfig
from roformer.positional import DEFAULTS, SCHEMES, PosConfig, RopeLayout, RopeScaling

HF_ACTIVATION = {Activation.gelu: "gelu", Activation.gelu_tanh: "gelu_pytorch_tanh"}


class ExportError(ValueError):
    """A checkpoint cannot be exported as asked (a setting to change; nothing was written)."""


@dataclass
class ExportConfig:
    """Settings of scripts/export_hf.py (configs/export_hf.yaml)."""

    # a checkpoint file or a run folder (its checkpoints/last.pt)
    ckpt: str | None = None
    # the model folder to write
    out: str | None = None
    # replace a non-empty ``out`` (atomically: the old folder is removed only once the new one is in place)
    overwrite: bool = False
    # after exporting, upload to this hub repository (needs ``huggingface-cli login``)
    push_to_hub: str | None = None
    # bake a RoPE context extension into the export: none | pi | ntk | dynamic_ntk | llama3 (yarn is refused)
    rope_scaling: str | None = None
    scaling_factor: float = 1.0
    # the length the extension extends from; 0: the checkpoint's training length
    original_len: int = 0

    def __post_init__(self) -> None:
        if not self.ckpt:
            raise ExportError("ckpt is not set; give a checkpoint file or run folder: ckpt=RUN")
        if not self.out:
            raise ExportError("out is not set; give the folder to write: out=DIR")
        if not isinstance(self.overwrite, bool):
            raise ExportError(f"overwrite={self.overwrite!r} must be true or false")
        try:
            self.scaling_factor, self.original_len = float(self.scaling_factor), int(self.original_len)
        except (TypeError, ValueError):
            raise ExportError(f"scaling_factor={self.scaling_factor!r} must be a number and original_len="
                              f"{self.original_len!r} a whole number of tokens") from None
        if self.rope_scaling is not None and self.rope_scaling not in {s.value for s in RopeScaling}:
            raise ExportError(f"rope_scaling={self.rope_scaling!r} is not a RoPE scaling; choose one of "
                              f"{[s.value for s in RopeScaling]}")


# ----------------------------------------------------------------------------------------------------------
# Configs


def _train_len(ckpt: dict) -> int | None:
    trainer = (ckpt.get("train_cfg") or {}).get("trainer") or {}
    return trainer.get("seq_len")


# the RoPE scalings _rope_settings maps (every other one is refused)
EXPORTED_SCALINGS = (RopeScaling.none, RopeScaling.pi, RopeScaling.ntk, RopeScaling.dynamic_ntk, RopeScaling.llama3)


def _rope_settings(pos: PosConfig, rot_dim: int) -> tuple[dict, int | None]:
    """GPT-NeoX's rotary settings for our RoPE config, and the max_position_embeddings they need (None: any).
    Given by the names transformers 4 and 5 both accept (5 stores them as ``rope_parameters``)."""
    rope = {"rotary_pct": pos.rotary_fraction, "rotary_emb_base": float(pos.base)}
    s, kind = pos.scaling_factor, pos.scaling
    if kind == RopeScaling.none or (s == 1.0 and kind in (RopeScaling.pi, RopeScaling.ntk, RopeScaling.llama3)):
        return rope, None
    if kind == RopeScaling.pi:
        return {**rope, "rope_scaling": {"rope_type": "linear", "factor": float(s)}}, None
    if kind == RopeScaling.ntk:  # static NTK changes the base and nothing else
        return {**rope, "rotary_emb_base": float(pos.base * s ** (rot_dim / (rot_dim - 2)))}, None
    if kind == RopeScaling.dynamic_ntk:
        return {**rope, "rope_scaling": {"rope_type": "dynamic", "factor": 1.0}}, pos.original_len
    if kind == RopeScaling.llama3:  # HF warns unless max_position_embeddings exceeds the original length
        return {**rope, "rope_scaling": {
            "rope_type": "llama3", "factor": float(s), "low_freq_factor": float(pos.low_freq_factor),
            "high_freq_factor": float(pos.high_freq_factor), "original_max_position_embeddings": pos.original_len,
        }}, math.ceil(s * pos.original_len)
    why = ("Hugging Face's YaRN ramps its interpolation by dimension index, ours by the number of rotations (as in "
           "the paper), so the logits would differ" if kind == RopeScaling.yarn
           else "no Hugging Face rope_type computes our frequencies")
    raise ExportError(f"pos.scaling={kind.value} cannot be exported: {why}; export with rope_scaling="
                      f"{', '.join(k.value for k in EXPORTED_SCALINGS)}")


def _neox_config(cfg: ModelConfig, pos: PosConfig, eod: int, train_len: int | None):
    from transformers import GPTNeoXConfig  # optional heavy dependency

    rot_dim = int(pos.rotary_fraction * cfg.head_dim)
    rope, max_pos = _rope_settings(pos, rot_dim)
    return GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, intermediate_size=int(cfg.mlp_ratio * cfg.d_model),
        hidden_act=HF_ACTIVATION[cfg.activation], **rope,
        max_position_embeddings=max_pos or train_len or 2048, layer_norm_eps=1e-5, use_parallel_residual=False,
        attention_bias=cfg.bias, tie_word_embeddings=cfg.tie_embeddings, hidden_dropout=0.0,
        attention_dropout=0.0, bos_token_id=eod, eos_token_id=eod,
    )


def _gpt2_config(cfg: ModelConfig, pos: PosConfig, eod: int, train_len: int | None):
    from transformers import GPT2Config  # optional heavy dependency

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=pos.max_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=int(cfg.mlp_ratio * cfg.d_model),
        activation_function=HF_ACTIVATION[cfg.activation], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eod,
        eos_token_id=eod,
    )


# ----------------------------------------------------------------------------------------------------------
# Weights: our state_dict -> the HF model's names (biases we lack are filled with zeros by _load)


def _qkv_to_neox(t: torch.Tensor, cfg: ModelConfig, pos: PosConfig) -> torch.Tensor:
    """Our fused qkv rows (3, H, D) -> GPT-NeoX's (H, 3, D); interleaved pairs -> NeoX's half pairs."""
    H, D = cfg.n_head, cfg.head_dim
    rest = t.shape[1:]  # (C,) for the weight, () for the bias
    t = t.reshape(3, H, D, *rest).clone()
    if pos.layout == RopeLayout.interleaved:
        r = int(pos.rotary_fraction * D)
        perm = torch.cat((torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, D)))
        t[:2] = t[:2, :, perm]  # queries and keys only; values are never rotated
    return t.transpose(0, 1).reshape(3 * H * D, *rest)


def _neox_weights(sd: dict, cfg: ModelConfig, pos: PosConfig) -> dict[str, torch.Tensor]:
    out = {"gpt_neox.embed_in.weight": sd["wte.weight"], "lm_head.weight": sd["lm_head.weight"]}
    names = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.proj": "attention.dense",
             "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{kind}" in sd:
                    out[f"gpt_neox.layers.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{kind}" in sd:
                out[f"gpt_neox.layers.{i}.attention.query_key_value.{kind}"] = _qkv_to_neox(
                    sd[f"blocks.{i}.attn.qkv.{kind}"], cfg, pos)
    for kind in ("weight", "bias"):
        if f"ln_f.{kind}" in sd:
            out[f"gpt_neox.final_layer_norm.{kind}"] = sd[f"ln_f.{kind}"]
    return out


def _gpt2_weights(sd: dict, cfg: ModelConfig, pos: PosConfig) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["pos.table.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    conv1d = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}  # GPT-2's Conv1D stores (in, out): transposed
    for i in range(cfg.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"blocks.{i}.{ours}.{kind}")
                if t is not None:
                    out[f"transformer.h.{i}.{theirs}.{kind}"] = t.t() if ours in conv1d and kind == "weight" else t
    for kind in ("weight", "bias"):
        if f"ln_f.{kind}" in sd:
            out[f"transformer.ln_f.{kind}"] = sd[f"ln_f.{kind}"]
    return out


@dataclass(frozen=True)
class Exporter:
    architecture: str  # the transformers class config.json names
    config: Callable  # (ModelConfig, PosConfig, eod id, training length) -> its transformers config
    weights: Callable  # (our state_dict, ModelConfig, PosConfig) -> {its parameter name: tensor}
    # the pos.* options of the scheme that config and weights map; another one it reads is exported only at its
    # default (a new option of the scheme is refused until mapped here)
    maps: frozenset[str] = frozenset()


# scheme name -> how to export it; every other scheme has no Hugging Face equivalent
EXPORTERS = {
    "rope": Exporter("GPTNeoXForCausalLM", _neox_config, _neox_weights,
                     frozenset({"base", "layout", "rotary_fraction", "scaling", "scaling_factor", "original_len",
                                "low_freq_factor", "high_freq_factor"})),
    "learned": Exporter("GPT2LMHeadModel", _gpt2_config, _gpt2_weights, frozenset({"max_len"})),
}

# why an option an exporter does not map has no Hugging Face equivalent, where more can be said than that
UNMAPPED_WHY = {
    "rotate_values": "the ablation that rotates values",
    "randomized_max": "randomized positions: Hugging Face numbers the positions 0 .. T-1",
}


def _setting(key: str, value) -> str:
    """``pos.<key>=<value>`` as a command line writes it."""
    value = value.value if isinstance(value, Enum) else str(value).lower() if isinstance(value, bool) else value
    return f"pos.{key}={value}"


def _check_unmapped(pos: PosConfig, exporter: Exporter) -> None:
    """Refuse, in one line, the options ``pos``'s scheme reads, ``exporter`` does not map, set to a non-default."""
    unmapped = [k for k in sorted(SCHEMES[pos.name].options - exporter.maps) if getattr(pos, k) != DEFAULTS[k]]
    if not unmapped:
        return
    given = ", ".join(_setting(k, getattr(pos, k)) + (f" ({UNMAPPED_WHY[k]})" if k in UNMAPPED_WHY else "")
                      for k in unmapped)
    raise ExportError(f"{given} cannot be exported: {exporter.architecture} has no equivalent; only checkpoints "
                      f"trained with {', '.join(_setting(k, DEFAULTS[k]) for k in unmapped)} can be exported")


def _load(hf_model, weights: dict[str, torch.Tensor]) -> None:
    """Load ``weights`` into ``hf_model``; its biases we have no counterpart for become zeros."""
    target = hf_model.state_dict()
    unknown = sorted(set(weights) - set(target))
    full = {}
    for key, ref in target.items():
        if key in weights:
            full[key] = weights[key].detach().to(torch.float32).contiguous()
        elif key.endswith(".bias"):
            full[key] = torch.zeros_like(ref)
        elif key != "lm_head.weight" or not hf_model.config.tie_word_embeddings:
            raise RuntimeError(f"internal: no weight for {key} in the export mapping")
    if unknown:
        raise RuntimeError(f"internal: the export mapping names weights the model lacks: {unknown[:3]}")
    hf_model.load_state_dict(full, strict=False)
    if hf_model.config.tie_word_embeddings:
        hf_model.tie_weights()


# ----------------------------------------------------------------------------------------------------------
# The export


def with_scaling(ckpt: dict, kind: str | None, factor: float = 1.0, original_len: int = 0) -> dict:
    """The checkpoint dict with a RoPE context extension recorded in its pos config (``original_len`` 0: the
    training length). ``kind`` None leaves it as trained."""
    if kind is None:
        return ckpt
    _, pos = configs_from_checkpoint(ckpt)
    if RopeScaling(kind) != RopeScaling.none and not pos.supports_scaling:
        raise ExportError(f"rope_scaling={kind} applies to pos=rope only; this checkpoint is pos={pos.name}: "
                          "drop rope_scaling")
    length = original_len or _train_len(ckpt) or 0
    pos_cfg = {**ckpt["pos_cfg"], "scaling": RopeScaling(kind).value, "scaling_factor": float(factor),
               "original_len": int(length)}
    try:
        PosConfig(**pos_cfg)
    except ValueError as e:
        raise ExportError(f"{one_line(e)}; set original_len=N (the training length) or scaling_factor") from None
    return {**ckpt, "pos_cfg": pos_cfg}


def hf_model_from_checkpoint(ckpt: dict):
    """The checkpoint as an in-memory ``transformers`` model (fp32, eval mode) and the end-of-document id.
    Raises :class:`ExportError` for what has no Hugging Face equivalent."""
    from transformers import AutoModelForCausalLM  # optional heavy dependency

    cfg, pos = configs_from_checkpoint(ckpt)
    exporter = EXPORTERS.get(pos.name)
    if exporter is None:
        raise ExportError(f"pos={pos.name} has no Hugging Face equivalent; export supports pos="
                          f"{' and pos='.join(sorted(EXPORTERS))}")
    if cfg.attention != AttentionKind.softmax:
        raise ExportError(f"model.attention={cfg.attention.value} has no Hugging Face equivalent; export supports "
                          "softmax attention with pos=" + " and pos=".join(sorted(EXPORTERS)))
    _check_unmapped(pos, exporter)
    eod = from_json(ckpt["tokenizer_json"]).token_to_id(EOD_TOKEN)
    if eod is None:
        raise ExportError(f"the checkpoint's tokenizer has no {EOD_TOKEN} token; export needs it as eos")
    hf_config = exporter.config(cfg, pos, eod, _train_len(ckpt))
    hf_config.architectures = [exporter.architecture]
    ours = model_from_checkpoint(ckpt)
    hf_model = AutoModelForCausalLM.from_config(hf_config).float()
    _load(hf_model, exporter.weights(ours.state_dict(), cfg, pos))
    return hf_model.eval(), eod


def _tokenizer(ckpt: dict, model_max_length: int):
    from transformers import PreTrainedTokenizerFast  # optional heavy dependency

    # byte-level BPE: no unknown token can occur; like GPT-2, the end-of-document token stands in for bos/unk
    return PreTrainedTokenizerFast(tokenizer_object=from_json(ckpt["tokenizer_json"]), eos_token=EOD_TOKEN,
                                   bos_token=EOD_TOKEN, unk_token=EOD_TOKEN, model_max_length=model_max_length)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``, before any work."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"out={out} is a non-empty folder; choose another out or add overwrite=true to replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` into ``out``; an existing ``out`` is renamed aside first, removed last."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.rename(out, aside / "old")
    try:
        os.rename(tmp, out)
    except BaseException:
        if aside is not None:
            os.rename(aside / "old", out)
            aside.rmdir()
        raise
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def export(ckpt_or_path: dict | str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the checkpoint (a dict, a .pt file or a run folder) as a Hugging Face model folder ``out_dir``.

    Raises :class:`ExportError` (or ``CheckpointError``) with one line, writing nothing, for a scheme or setting
    without a Hugging Face equivalent or a non-empty ``out_dir`` without ``overwrite``. Returns ``out_dir``.
    """
    out = Path(out_dir)
    check_out(out, overwrite)
    ckpt = ckpt_or_path if isinstance(ckpt_or_path, dict) else load_checkpoint(ckpt_or_path)
    if "tokenizer_json" not in ckpt or "model" not in ckpt:
        raise CheckpointError("the checkpoint has no tokenizer_json or model weights; give a training checkpoint")
    hf_model, eod = hf_model_from_checkpoint(ckpt)
    tokenizer = _tokenizer(ckpt, hf_model.config.max_position_embeddings)  # GPT-2: an alias of n_positions
    hf_model.generation_config.eos_token_id = hf_model.generation_config.bos_token_id = eod
    hf_model.generation_config.pad_token_id = eod
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # what mkdir gives, not mkdtemp's 0700: others may read the model
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check_out(out, overwrite)  # still true after the work: another writer may have filled it meanwhile
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push_to_hub(out: str | os.PathLike, repo: str) -> None:
    """Upload an exported folder to the hub repository ``repo`` (needs ``huggingface-cli login``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional heavy dependency

    AutoModelForCausalLM.from_pretrained(out).push_to_hub(repo)
    AutoTokenizer.from_pretrained(out).push_to_hub(repo)
