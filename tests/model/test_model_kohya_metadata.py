"""The kohya file as A1111 / ComfyUI / SwarmUI see it: fp16 by default, ``modelspec.*`` keys, and
``sshs_*`` hashes that match the file's bytes the way kohya's tools define them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora.config import make_config
from lora.model import (
    attach_lora,
    export_kohya,
    infer_trigger_word,
    load_pipeline,
    lora_parameters,
    model_hashes,
)
from lora.train.export import training_metadata

RANK, ALPHA = 4, 8.0


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _tensor_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


def _trained_unet(tiny_components, seed=1):
    unet = tiny_components.unet
    attach_lora(unet, rank=RANK, alpha=ALPHA, init_seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def test_fp16_by_default_half_the_size_and_loads_in_diffusers(tiny_components, tmp_path):
    unet = _trained_unet(tiny_components)
    x = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([500]),
         torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        want = unet(*x).sample
    half = export_kohya(unet, tmp_path / "half" / "run.safetensors", rank=RANK, alpha=ALPHA)
    full = export_kohya(unet, tmp_path / "full" / "run.safetensors", rank=RANK, alpha=ALPHA, dtype=torch.float32)
    tensors, _ = _read(half)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert len(_tensor_bytes(half)) * 2 == len(_tensor_bytes(full))
    # still a file diffusers' kohya converter reads, giving the trained adapter (to fp16 precision)
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(half.parent, weight_name=half.name)
    with torch.no_grad():
        got = pipe.unet(*x).sample
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-3)


def test_hashes_match_the_file_as_kohya_and_a1111_compute_them(tiny_components, tmp_path):
    unet = _trained_unet(tiny_components)
    meta = {"ss_learning_rate": "5e-05", "modelspec.title": "first title"}
    path = export_kohya(unet, tmp_path / "a.safetensors", rank=RANK, alpha=ALPHA, metadata=meta)
    tensors, header = _read(path)
    data_digest = hashlib.sha256(_tensor_bytes(path)).hexdigest()
    assert header["sshs_model_hash"] == data_digest  # A1111's hash of a safetensors LoRA
    assert header["modelspec.hash_sha256"] == "0x" + data_digest
    # legacy: 64 KiB at 1 MiB of the file saved with only the ss_* keys (this file is smaller)
    ss_only = tmp_path / "ss_only.safetensors"
    save_file(tensors, str(ss_only), metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    assert header["sshs_legacy_hash"] == hashlib.sha256(ss_only.read_bytes()[0x100000:0x110000]).hexdigest()[:8]

    # editing non-training metadata changes neither hash; other weights change the model hash
    retitled = export_kohya(unet, tmp_path / "b.safetensors", rank=RANK, alpha=ALPHA,
                            metadata={**meta, "modelspec.title": "another title"})
    assert _read(retitled)[1]["sshs_model_hash"] == header["sshs_model_hash"]
    with torch.no_grad():
        next(iter(lora_parameters(unet))).add_(1.0)
    changed = export_kohya(unet, tmp_path / "c.safetensors", rank=RANK, alpha=ALPHA, metadata=meta)
    assert _read(changed)[1]["sshs_model_hash"] != header["sshs_model_hash"]


def test_legacy_hash_reads_past_the_first_mebibyte(tmp_path):
    """A LoRA over 1 MiB (the usual case): the legacy hash covers the bytes at offset 1 MiB."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(400_000, dtype=torch.float32).reshape(400, 1000)}
    meta = {"ss_network_dim": "4", "modelspec.title": "not hashed"}
    hashes = model_hashes(tensors, meta)
    on_disk = tmp_path / "big.safetensors"
    save_file(tensors, str(on_disk), metadata={"ss_network_dim": "4"})
    window = on_disk.read_bytes()[0x100000:0x110000]
    assert len(window) == 0x10000
    assert hashes["sshs_legacy_hash"] == hashlib.sha256(window).hexdigest()[:8]
    assert hashes["sshs_model_hash"] == hashlib.sha256(_tensor_bytes(on_disk)).hexdigest()


def _plan(captions, tmp_path):
    items = [SimpleNamespace(caption=c, name=f"images/{i}.png") for i, c in enumerate(captions)]
    return SimpleNamespace(dataset_dir=tmp_path / "anime", version="v0003", train_items=items,
                           val_items=items[:1], steps_per_epoch=3, total_steps=30)


def test_training_metadata_has_modelspec_and_the_trigger_phrase(tmp_path):
    cfg = make_config({"run_name": "mystyle-v1", "resolution": 512, "model": "tiny"})
    captions = ["mystyle, 1girl, solo, smile", "mystyle, 1boy, outdoors", "mystyle, no humans, sky"]
    meta = training_metadata(cfg, _plan(captions, tmp_path), {"epoch": 3, "step_in_epoch": 0,
                                                                "global_step": 30}, "fp16", now=0)
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "mystyle-v1"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.trigger_phrase"] == "mystyle"
    assert meta["modelspec.date"] == "1970-01-01T00:00:00+00:00"
    assert meta["ss_steps"] == "30" and meta["ss_epoch"] == "2" and meta["ss_dataset_version"] == "v0003"
    assert json.loads(meta["ss_tag_frequency"])["anime"]["mystyle"] == 3
    assert all(isinstance(v, str) for v in meta.values())


def test_trigger_word_is_not_guessed_from_count_tags_or_mixed_heads():
    assert infer_trigger_word(["1girl, solo, smile", "1girl, long hair"]) is None
    assert infer_trigger_word(["mystyle, 1girl", "1girl, mystyle"]) is None
    assert infer_trigger_word(["mystyle"]) is None
    assert infer_trigger_word([]) is None
    assert infer_trigger_word(["mystyle, 1girl", "mystyle, sky"]) == "mystyle"
