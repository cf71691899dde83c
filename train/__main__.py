"""usage: python -m train CONFIG.yaml [section.key=value ...] [--print-config] [--help]

Trains the model CONFIG.yaml describes (configs/ holds presets); `section.key=value` overrides any key, e.g.
`train.max_steps=50 parallel.tp=2`. --print-config prints the resolved configuration as YAML and exits;
--help lists every key with its type, default and meaning."""

from __future__ import annotations

import os
import sys

from model.errors import UserError

USAGE = __doc__.split("\n\n")[0]
FLAGS = ("--help", "-h", "--print-config")


def _error(message: str) -> int:
    # Every rank of a torchrun world sees the same bad input; one line on the console is enough.
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        from train.config import Config
        from train.config_help import render_help

        print(render_help(Config, __doc__.strip()), end="")
        return 0
    args = [a for a in argv if a not in FLAGS]
    unknown = [a for a in args[1:] if a.startswith("-")]
    if not args or args[0].startswith("-") or unknown:
        bad = unknown[0] if unknown else (args[0] if args else None)
        return _error(f"{bad}: unknown option; {USAGE[7:]}" if bad else USAGE)
    config_path, overrides = args[0], args[1:]
    from train.config import config_yaml, load_config

    try:
        cfg = load_config(config_path, overrides)
    except UserError as e:
        return _error(f"config error: {e}")
    if "--print-config" in argv:
        print(config_yaml(cfg), end="")
        return 0
    from model.config import ConfigError
    from parallel.mesh import CollectiveError
    from train.trainer import NonFiniteStateError, run

    try:
        run(cfg)
    except ConfigError as e:  # layout checks that need WORLD_SIZE run inside run()
        return _error(f"config error: {e}")
    except UserError as e:  # bad data, checkpoints or layouts found once the run starts; a bug keeps its traceback
        return _error(f"error: {e}")
    except NonFiniteStateError as e:
        return _error(f"error: {e}")
    except CollectiveError as e:
        # Only the rank that waited knows what it waited for: every such rank prints its line. Then leave at once:
        # a normal exit joins the stuck background writer thread (and a stuck peer never arrives), so it would hang.
        print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """After a successful run, as torchtitan does: tear the process group down while the interpreter is alive.
    Left to interpreter exit, gloo's threads can abort a finished rank and NCCL warns about leaked communicators.
    Not after a failure: peers may still be inside a collective, and tearing down under them hangs or aborts."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # nobody destroys the group while a peer still uses it (e.g. a last checkpoint write)
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
