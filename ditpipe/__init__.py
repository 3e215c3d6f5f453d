"""ditpipe: train text-to-image Diffusion Transformers from an image+caption dataset."""

__version__ = "0.1.0"


def _quiet_libraries() -> None:
    """Silence per-load progress bars and dtype chatter from diffusers/transformers."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


_quiet_libraries()
