"""`python -m train CONFIG.yaml [dotted.key=value ...]`

`python -m train CONFIG.yaml --plan [--device-gib N] [dotted.key=value ...]` prints the memory plan per rank for
the configured layout (world = parallel.dp x tp x pp) and exits: no process group, nothing allocated."""

from __future__ import annotations

import os
import sys

from model.config import ConfigError


def _error(message: str) -> int:
    # Every rank of a torchrun world sees the same bad input; one line on the console is enough.
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nExample: python -m train configs/tiny-cpu.yaml train.max_steps=50")
        return 0 if argv else 2
    config_path, rest = argv[0], argv[1:]
    try:
        overrides, plan_only, device_gib = _plan_flags(rest)
    except ValueError as e:
        return _error(f"usage error: {e}")
    from train.config import load_config

    try:
        cfg = load_config(config_path, overrides)
        if plan_only:
            from train.memory import print_plan

            return print_plan(cfg, device_gib)
    except ConfigError as e:
        return _error(f"config error: {e}")
    from parallel.mesh import CollectiveError
    from train.trainer import NonFiniteStateError, run

    try:
        run(cfg)
    except ConfigError as e:  # layout checks that need WORLD_SIZE run inside run()
        return _error(f"config error: {e}")
    except CollectiveError as e:
        # Only the rank that waited knows what it waited for: every such rank prints its line. Then leave at once:
        # a normal exit joins the stuck background writer thread (and a stuck peer never arrives), so it would hang.
        print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # Bad data or device requests surface as one line; real bugs keep their traceback (other exceptions).
        if isinstance(e, RuntimeError) and not isinstance(e, NonFiniteStateError) and not str(e).startswith("train."):
            raise
        return _error(f"error: {e}")
    _close_process_group()
    return 0


def _plan_flags(args: list[str]) -> tuple[list[str], bool, float | None]:
    """(overrides, --plan given, --device-gib value) from the arguments after the config file."""
    overrides, plan, device_gib = [], False, None
    it = iter(args)
    for arg in it:
        if arg == "--plan":
            plan = True
        elif arg == "--device-gib" or arg.startswith("--device-gib="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            try:
                device_gib = float(value) if value is not None else None
            except ValueError:
                device_gib = None
            if device_gib is None or device_gib <= 0:
                raise ValueError(f"--device-gib: expected a positive number of GiB, got {value!r}")
        elif arg.startswith("--"):
            raise ValueError(f"{arg}: unknown option; the options are --plan and --device-gib N")
        else:
            overrides.append(arg)
    if device_gib is not None and not plan:
        raise ValueError("--device-gib: only used with --plan (a run compares against its own device)")
    return overrides, plan, device_gib


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
