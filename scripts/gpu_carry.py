"""Make what an offline GPU machine lacks for scripts/gpu_check.py, in one folder to carry there (one command).

    python scripts/gpu_carry.py                          # -> .gpu_carry/ (git-ignored)
    python scripts/gpu_carry.py --nanogpt ~/nanoGPT      # also the nanoGPT model.py the benchmark times as a peer

What it makes, in OUT (default ``.gpu_carry``):

* ``wheels/``: pure-Python wheels of hydra-core, omegaconf and antlr4-python3-runtime, at the versions installed
  here (``pip wheel --no-deps``: antlr4 4.9.3, which hydra 1.3 pins, is published as a source archive only, so it
  is built into a wheel here; all three are ``py3-none-any``, so they install under any Python 3 there);
* ``data/wikitext2/<key>/``: a WikiText-2 token cache keyed on its tokenizer *file* (``data.tokenizer_path``), which
  opens under any version of ``tokenizers`` (the default cache's key holds the version that trained the tokenizer,
  and the GPU machine has another);
* ``nanogpt/model.py`` with ``--nanogpt``: the file from the user's checkout, for ``benchmark.py --peer nanogpt=``
  (never committed: OUT is ignored by git).

Then on the GPU machine, from the repository root: ``python3 scripts/gpu_check.py OUT_DIR --carry .gpu_carry``
installs the wheels into a temporary folder on its own PYTHONPATH, uses the carried token cache and, when
``nanogpt/`` is there, adds nanoGPT to the benchmark. The last lines printed here say what to carry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from roformer.data import DataConfig, prepare  # noqa: E402
from roformer.files import ensure_writable  # noqa: E402

PACKAGES = ("hydra-core", "omegaconf", "antlr4-python3-runtime")


def wheels(out: Path) -> list[Path]:
    """Pure-Python wheels of PACKAGES at the versions installed here, into ``out`` (replaced whole)."""
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp, *pins],
                       check=True)  # fmt: skip
        made = sorted(Path(tmp).glob("*.whl"))
        if len(made) != len(PACKAGES) or any(not w.name.endswith("-py3-none-any.whl") for w in made):
            raise SystemExit(f"error: expected {len(PACKAGES)} pure-Python wheels, pip made {[w.name for w in made]}")
        shutil.rmtree(out, ignore_errors=True)
        Path(tmp).rename(out)
    return sorted(out.glob("*.whl"))


def token_cache(out: Path) -> Path:
    """A WikiText-2 cache keyed on its tokenizer file, copied to ``out/wikitext2/<key>``; returns that folder."""
    cfg = DataConfig(cache_dir=str(ROOT / "data"))
    default = prepare(cfg, progress=False)  # builds the default cache if it is not there (offline: embedded corpus)
    by_file = prepare(replace(cfg, tokenizer_path=str(Path(default.cache_path) / "tokenizer.json")), progress=False)
    meta = json.loads((Path(by_file.cache_path) / "meta.json").read_text())
    if "file_sha256" not in json.dumps(meta.get("key_inputs", {})):
        raise SystemExit(f"error: {by_file.cache_path} is not keyed on a tokenizer file (meta.json key_inputs)")
    dest = out / "wikitext2" / Path(by_file.cache_path).name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(by_file.cache_path, dest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / ".gpu_carry"), help="the folder to carry (default .gpu_carry)")
    ap.add_argument("--nanogpt", default="", help="a nanoGPT checkout (or its model.py) to time as a peer")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    nano = None
    if args.nanogpt:
        nano = Path(args.nanogpt).expanduser()
        nano = nano / "model.py" if nano.is_dir() else nano
        if not nano.is_file():
            print(f"error: --nanogpt {args.nanogpt}: no model.py there; give a nanoGPT checkout", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    ensure_writable(out, "--out")
    made = wheels(out / "wheels")
    cache = token_cache(out / "data")
    if nano is not None:
        (out / "nanogpt").mkdir(exist_ok=True)
        shutil.copyfile(nano, out / "nanogpt" / "model.py")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    print(f"{rel}: {', '.join(w.name for w in made)}; token cache {cache.relative_to(out)}"
          + ("; nanogpt/model.py" if nano is not None else "") + f"; {size:.1f} MB")  # fmt: skip
    print(f"carry: {rel}   then run: python3 scripts/gpu_check.py OUT_DIR --carry {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
