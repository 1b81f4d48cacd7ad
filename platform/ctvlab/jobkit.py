"""The common shape of every script under jobs/: parse, load the config, run one function, exit.

Each job works the same locally (`python jobs/<name>.py --config ...`) and on a cluster
(`ray job submit --address ... --working-dir . -- python jobs/<name>.py --config ...`; inside a submitted
job RAY_ADDRESS is set, and `ctvlab.runtime.init_ray` joins that cluster and ships the package to its
workers). `--smoke-test` swaps in tiny CPU-only settings (`ctvlab.config.apply_smoke_test`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml"


def run_job(main: Callable[[Any, argparse.Namespace], int | None], description: str,
            add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:  # fmt: skip
    """Parse the standard options (and the job's own), load the config, call `main(cfg, args)`, exit.

    A `CtvlabError` prints its message and exits with its code; nothing prints a traceback for a
    problem the user can fix.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="study config (YAML)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--smoke-test", action="store_true", help="tiny CPU-only settings, a few minutes")
    if add_args:
        add_args(parser)
    args = parser.parse_args()

    from rich.console import Console

    from ctvlab.config import apply_smoke_test, load_config
    from ctvlab.errors import CtvlabError

    console = Console(stderr=True, highlight=False)
    try:
        cfg = load_config(args.config)
        if args.smoke_test or cfg.smoke_test:
            cfg = apply_smoke_test(cfg)
        if args.tracking_uri:
            cfg.tracking.tracking_uri = args.tracking_uri
        cfg.ray.address = args.address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
        code = main(cfg, args)
    except CtvlabError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    sys.exit(code or 0)
