"""Export a checkpoint (any parallel layout) to a Hugging Face folder, on CPU, in one process.

    python tools/convert_to_hf.py --checkpoint RUN_OR_STEP_DIR --out HF_DIR [--dtype fp32|bf16]
        [--format auto|moepp|mixtral] [--max-shard-size-mb N] [--overwrite] [--no-verify]

MoE++ models get the layout of the public MoE++-7B release when it expresses them exactly, else our own config
fields (the console says why); both load with AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True).
A vanilla MoE with Mixtral's gates is exported as native MixtralForCausalLM (--format auto or mixtral).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="run dir, checkpoints dir or step directory")
    p.add_argument("--out", required=True, type=Path, help="Hugging Face folder to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype (default fp32, lossless)")
    p.add_argument("--format", choices=["auto", "moepp", "mixtral"], default="auto")
    p.add_argument("--max-shard-size-mb", type=int, default=5 * 1024)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument(
        "--no-verify", action="store_true", help="skip the shard checksums (for a checkpoint saved without them)"
    )
    args = p.parse_args(argv)
    from tools.hf.export import export

    try:
        export(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            fmt=args.format,
            max_shard_bytes=args.max_shard_size_mb * 1024**2,
            overwrite=args.overwrite,
            verify=not args.no_verify,
        )
    except UserError as e:  # bad input: one line; anything else is a bug
        print(f"convert_to_hf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
