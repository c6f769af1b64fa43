"""Export a trained checkpoint as a Hugging Face model folder (safetensors, config, tokenizer).

    python scripts/export_hf.py ckpt=outputs/2026-01-01/12-00-00 out=hf/rope        # a run folder's last.pt
    python scripts/export_hf.py ckpt=RUN/checkpoints/best.pt out=hf/rope overwrite=true
    python scripts/export_hf.py ckpt=RUN out=hf/rope rope_scaling=pi scaling_factor=4   # bake in an extension
    python scripts/export_hf.py ckpt=RUN out=hf/rope push_to_hub=USER/REPO              # then upload

pos=rope exports as GPTNeoXForCausalLM (either layout, any rotary_fraction and base), pos=learned as
GPT2LMHeadModel; other schemes, linear attention and YaRN are refused. Load the result with
``AutoModelForCausalLM.from_pretrained(DIR)``. Exit status: 2 for a bad setting (nothing written), 1 for a
failure while writing or pushing. Settings: configs/export_hf.yaml; the mapping: roformer/hf_export.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from roformer.checkpoint import CheckpointError, load_checkpoint
from roformer.files import one_line
from roformer.hf_export import ExportConfig, check_out, export, push_to_hub, with_scaling


@hydra.main(version_base="1.3", config_path="../configs", config_name="export_hf")
def main(cfg: DictConfig) -> None:
    from transformers.utils import logging as hf_logging  # heavy; after Hydra has parsed the command line

    hf_logging.disable_progress_bar()  # one line per outcome, no "Writing model shards" bars
    try:
        settings = ExportConfig(**OmegaConf.to_container(cfg, resolve=True))
        check_out(Path(settings.out), settings.overwrite)  # before the (slow) checkpoint load
        ckpt = with_scaling(load_checkpoint(settings.ckpt), settings.rope_scaling, settings.scaling_factor,
                            settings.original_len)
    except CheckpointError as e:
        print(f"error: {one_line(e)}; give ckpt= a training run folder or one of its checkpoints/*.pt",
              file=sys.stderr)
        sys.exit(2)
    except (ValueError, TypeError) as e:  # our errors (ExportError, CheckpointError) are one line for people
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    try:
        out = export(ckpt, settings.out, overwrite=settings.overwrite)
    except ValueError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: cannot write out={settings.out}: {one_line(e)}; nothing was written", file=sys.stderr)
        sys.exit(1)
    print(f"exported {settings.ckpt} to {out}")
    if settings.push_to_hub:
        try:
            push_to_hub(out, settings.push_to_hub)
        except Exception as e:  # offline, not logged in, no rights: the export itself is done
            print(f"error: push to the hub repository {settings.push_to_hub} failed ({one_line(e, 200)}); "
                  f"the export is in {out}; run `huggingface-cli login` and retry with push_to_hub=",
                  file=sys.stderr)
            sys.exit(1)
        print(f"pushed {out} to https://huggingface.co/{settings.push_to_hub}")


if __name__ == "__main__":
    main()
