"""Import a Hugging Face folder (MoE++ release layout such as the public MoE++-7B, moepp's own layout, or Mixtral)
as a checkpoint that pretraining continues from.

    python tools/convert_from_hf.py --hf HF_DIR --out CHECKPOINT_DIR

Writes CHECKPOINT_DIR/step_00000000 (DCP shards + meta.json with the full config), CHECKPOINT_DIR/latest and
CHECKPOINT_DIR/config.yaml; then: python -m train CHECKPOINT_DIR/config.yaml data.path=... \
train.resume=CHECKPOINT_DIR/step_00000000
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
    p.add_argument("--hf", required=True, type=Path, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to create")
    args = p.parse_args(argv)
    from tools.hf.importer import import_hf

    try:
        import_hf(args.hf, args.out)
    except (UserError, FileNotFoundError) as e:  # bad input: one line; anything else is a bug
        print(f"convert_from_hf: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
