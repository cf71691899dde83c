"""`python -m train CONFIG.yaml [dotted.key=value ...]`"""

from __future__ import annotations

import sys

from model.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nExample: python -m train configs/tiny-cpu.yaml train.max_steps=50")
        return 0 if argv else 2
    config_path, overrides = argv[0], argv[1:]
    from train.config import load_config

    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from train.trainer import run

    try:
        run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad data or device requests surface as one line; real bugs keep their traceback (other exceptions).
        if isinstance(e, RuntimeError) and not str(e).startswith("train."):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
