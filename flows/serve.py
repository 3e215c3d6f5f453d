"""Serve the ``dit-pipeline/default`` deployment from this folder (needs a Prefect server).

    prefect server start &                 # or PREFECT_API_URL pointing at one
    python -m flows.serve &                # this process runs the flow runs, in this folder
    prefect deployment run 'dit-pipeline/default' --param overrides='["data.count=500"]' --watch
"""

from __future__ import annotations

import argparse

from flows.pipeline import dit_pipeline


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the dit-pipeline deployment.")
    p.add_argument("--name", default="default", help="deployment name (default: default)")
    args = p.parse_args(argv)
    dit_pipeline.serve(name=args.name, parameters={"params": "params.yaml"})


if __name__ == "__main__":
    main()
