"""``DitpipePipeline``: an exported ditpipe run as a diffusers pipeline.

    from ditpipe.pipeline import DitpipePipeline
    pipe = DitpipePipeline.from_pretrained("artifacts/export")
    images = pipe("a large red circle above a small blue square", num_images_per_prompt=4).images

Why our own pipeline class: the stock PixArt and SD3 pipelines assume T5 / CLIP text encoders and
their own prompt handling; ditpipe runs may use any transformers encoder (MiniLM by default), pooled
the way the ``text`` stage pooled it, and any of four denoiser architectures. The sampling loop is the
one ``evaluate`` measured (``ditpipe.sampling``), so the exported model draws what was evaluated.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ditpipe.autoencoder import decode, to_image
from ditpipe.encoders import embed_captions
from ditpipe.models import Denoiser, arch_of
from ditpipe.sampling import Conditioning, sample


class DitpipePipeline(DiffusionPipeline):
    """Text to image with a ditpipe denoiser, its VAE, its text encoder and a diffusers scheduler."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer, vae: AutoencoderKL, scheduler: SchedulerMixin, text_encoder, tokenizer,
                 max_length: int = 32, default_steps: int = 30, default_guidance_scale: float = 4.0):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(max_length=max_length, default_steps=default_steps,
                                default_guidance_scale=default_guidance_scale)

    def encode_prompt(self, prompts: list[str]) -> tuple[Conditioning, dict[str, torch.Tensor]]:
        """The prompts' embeddings and the empty caption's (the unconditional branch of guidance)."""
        out = embed_captions(self.text_encoder, self.tokenizer, [*prompts, ""], int(self.config.max_length))
        out = {k: v.cpu() for k, v in out.items()}
        n = len(prompts)
        return Conditioning(out["emb"][:n], out["mask"][:n], out["pooled"][:n]), {k: v[n] for k, v in out.items()}

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_images_per_prompt: int = 1, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, generator: torch.Generator | None = None,
                 batch_size: int = 64, output_type: str = "pil", return_dict: bool = True):
        """Images of ``prompt``. Image i draws its noise from seed ``seed + i`` (or from ``generator``'s draws),
        so the same seed draws the same noise, and the same image up to float rounding, whatever the batch size."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        steps = num_inference_steps or int(self.config.default_steps)
        scale = guidance_scale if guidance_scale is not None else float(self.config.default_guidance_scale)
        if generator is not None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        else:
            seeds = list(range(seed, seed + len(prompts)))
        cond, empty = self.encode_prompt(prompts)
        model = Denoiser(self.transformer, arch_of(self.transformer)).eval()
        cfg = self.transformer.config
        size = cfg.sample_size
        shape = (int(cfg.in_channels), int(size), int(size))
        latents = sample(model, self.scheduler, cond, empty, seeds, shape, steps=steps, guidance_scale=scale,
                         batch_size=batch_size)
        if output_type == "latent":
            images = latents
        else:
            pixels = decode(self.vae, latents)
            images = [to_image(x) for x in pixels] if output_type == "pil" else (pixels + 1) / 2
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
