"""Shared fixtures: small real datasets, tiny models saved with save_pretrained, and CLI runners."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each test process (and the stages it starts) gets its share of the cores: torch otherwise
# takes a thread per core in every process and they spin against each other (DESIGN: two torch processes thrash).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)  # as ditpipe.cluster splits a local Dask cluster's cores
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))
    if "torch" in sys.modules:  # a plugin imported it before the variables were set
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
TWEMOJI = REPO / "tests" / "fixtures" / "twemoji"  # 40 real CC-BY 4.0 images, shipped (see its ATTRIBUTION.md)


def committed(path: str) -> bytes:
    """A file as committed at HEAD (what a fresh clone gets), whatever the user has edited since."""
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, check=True).stdout


@pytest.fixture
def twemoji_subset(tmp_path: Path) -> Path:
    """A copy of the first 40 twemoji (images + metadata.jsonl), free to break."""
    src = TWEMOJI
    dst = tmp_path / "twemoji"
    (dst / "images").mkdir(parents=True)
    rows = []
    with open(src / "metadata.jsonl") as f:
        for line in f:
            row = json.loads(line)
            shutil.copy(src / row["file_name"], dst / row["file_name"])
            rows.append(row)
            if len(rows) == 40:
                break
    (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


TINY_VAE = ["vae.block_out_channels=[8,16]", "vae.steps=3", "vae.batch_size=8", "vae.layers_per_block=1"]


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory) -> Path:
    """A tiny random BERT with MiniLM's real tokenizer, saved with save_pretrained."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ditpipe.encoders import ENCODERS

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(ENCODERS["all-MiniLM-L6-v2"]())
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def mlflow_server(folder: Path, env: dict | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store and artifacts in ``folder``); yields its URI."""
    port = free_port()
    log = open(folder / "mlflow.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--artifacts-destination", str(folder / "mlartifacts"), "--workers", "1"],
                            env=env or os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200,
                 120, "mlflow server", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """A local S3-compatible server (moto's server mode) on 127.0.0.1 with one bucket; yields ``s3://BUCKET``.
    The endpoint and credentials go into the environment, as a user sets them for real S3 (and DVC reads
    its endpoint from its remote config)."""
    import fsspec

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status == 200, 60,
                 "moto server", proc)
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("ditpipe-test")
        yield "s3://ditpipe-test"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture
def cli(monkeypatch, capsys):
    """``ditpipe ARGS`` in this process (no interpreter start-up): returns (exit code, stdout, stderr)."""
    from ditpipe.cli import main

    def call(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return call


def run_cli(*args: str, cwd: Path | str | None = None, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ditpipe ARGS`` in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "ditpipe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"ditpipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_text_encoder) -> Path:
    """60 shapes at 16px through every data stage: 4x8x8 latents (with flips), 32-d captions, 7 per shard."""
    from ditpipe.config import DataConfig, LatentsConfig, ShardsConfig, TextConfig, VaeConfig
    from ditpipe.latents import run as latents
    from ditpipe.prepare import run as prepare
    from ditpipe.shards import run as shards
    from ditpipe.text import run as text
    from ditpipe.vae import run as vae

    p = tmp_path_factory.mktemp("pipeline")
    prepare(DataConfig(count=60, resolution=16, val_fraction=0.2), p / "prepared")
    vae(VaeConfig(block_out_channels=(8, 16), latent_channels=4, steps=2, batch_size=8), p / "prepared", p / "vae")
    latents(LatentsConfig(flip=True), p / "prepared", p / "vae", p / "latents")
    text(TextConfig(encoder=str(tiny_text_encoder), max_length=8), p / "prepared", p / "text")
    shards(ShardsConfig(max_samples=7), p / "prepared", p / "latents", p / "text", p / "shards")
    return p


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte as a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP with a byte-level BPE vocabulary, saved with save_pretrained like a real one."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tok = CLIPTokenizer.from_pretrained(path)
    assert tok.convert_tokens_to_ids("red</w>") in tok("a red circle").input_ids  # the merges were read
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, **ids)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path
