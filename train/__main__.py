"""usage: python -m train CONFIG.yaml [section.key=value ...] [--plan [--device-gib N]] [--print-config] [--help]

Trains the model CONFIG.yaml describes (configs/ holds presets); `section.key=value` overrides any key, e.g.
`train.max_steps=50 parallel.tp=2`. --plan prints the memory plan per rank for the configured layout (world =
parallel.dp x tp x pp; --device-gib N compares it against devices of N GiB) and exits: no process group, nothing
allocated. --print-config prints the resolved configuration as YAML and exits; --help lists every key with its
type, default and meaning."""

from __future__ import annotations

import os
import sys

from model.config import ConfigError
from model.errors import UserError

USAGE = __doc__.split("\n\n")[0]


class UsageError(UserError):
    """A command-line option that does not exist or lacks its value."""


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
    try:
        config_path, overrides, flags, device_gib = _parse(argv)
    except UsageError as e:
        return _error(str(e))
    from train.config_load import config_yaml, load_config

    try:
        cfg = load_config(config_path, overrides)
        if "--plan" in flags:
            from train.memory import print_plan

            return print_plan(cfg, device_gib)
    except UserError as e:
        return _error(f"config error: {e}")
    if "--print-config" in flags:
        print(config_yaml(cfg), end="")
        return 0
    from parallel.mesh import CollectiveError
    from train.trainer import NonFiniteStateError, run

    try:
        run(cfg)
    except ConfigError as e:  # layout checks that need WORLD_SIZE run inside run()
        return _error(f"config error: {e}")
    except UserError as e:  # bad data, checkpoints or devices found once the run starts; a bug keeps its traceback
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


def _parse(argv: list[str]) -> tuple[str, list[str], set[str], float | None]:
    """(config path, overrides, flags given, --device-gib value) or a UsageError naming the bad argument."""
    if not argv or argv[0].startswith("-"):
        raise UsageError(USAGE)
    overrides: list[str] = []
    flags: set[str] = set()
    device_gib = None
    it = iter(argv[1:])
    for arg in it:
        if arg in ("--plan", "--print-config"):
            flags.add(arg)
        elif arg == "--device-gib" or arg.startswith("--device-gib="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            try:
                device_gib = float(value) if value is not None else None
            except ValueError:
                device_gib = None
            if device_gib is None or device_gib <= 0:
                raise UsageError(f"usage error: --device-gib: expected a positive number of GiB, got {value!r}")
        elif arg.startswith("-"):
            raise UsageError(f"usage error: {arg}: unknown option; {USAGE[7:]}")
        else:
            overrides.append(arg)
    if device_gib is not None and "--plan" not in flags:
        raise UsageError("usage error: --device-gib: only used with --plan (a run compares against its own device)")
    return argv[0], overrides, flags, device_gib


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
