"""`lbr`: the lbr-ray command line. Each command parses its options and calls lbr_ray; no logic here."""
from __future__ import annotations

import os
import sys

import typer

from lbr_ray.errors import LbrError, find_lbr_error

app = typer.Typer(
    name="lbr",
    help="Train and evaluate Learn-Before-Represent (LBR) domain embedding models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from cli import cluster, convert, export, mine, plan, study, train, tune  # noqa: E402  (each registers its commands)
from cli import eval as evaluate  # noqa: E402

for _module in (train, evaluate, export, convert, mine, cluster, tune, study, plan):
    _module.register(app)


def main() -> None:
    """Console entry point: an LbrError becomes one line on stderr and exit code 2 (LBR_DEBUG=1: traceback).
    Hugging Face's progress bars (a "Loading weights" bar per model load) stay off the console, in this process and
    the Ray workers it starts, unless --verbose or HF_HUB_DISABLE_PROGRESS_BARS says otherwise."""
    if "--verbose" not in sys.argv:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001
        err = find_lbr_error(exc)
        if err is None or os.environ.get("LBR_DEBUG") == "1":
            raise
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()
