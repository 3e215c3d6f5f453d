"""Serve the ``dit-pipeline/default`` deployment from this folder (no work pool needed).

    export PREFECT_API_URL=http://127.0.0.1:4200/api   # every prefect command below talks to this server
    prefect server start --background
    python -m flows.serve &                # this process runs the flow runs, in this folder
    prefect deployment run 'dit-pipeline/default' --param overrides='["data.count=500"]' --watch

For a work pool and worker instead, see ``prefect.yaml`` and ``python -m flows.local up``.
"""

from __future__ import annotations

import argparse

from flows.pipeline import dit_pipeline


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the dit-pipeline deployment from the current folder.")
    p.add_argument("--name", default="default", help="deployment name (default: default)")
    args = p.parse_args(argv)
    dit_pipeline.serve(name=args.name)


if __name__ == "__main__":
    main()
