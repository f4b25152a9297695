"""Issue 4: extraction survives SIGKILL without redoing finished chunks; bf16 VGG16 agrees with fp32."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from recsketch.config import Settings
from recsketch.contracts import ValidModels
from recsketch.crawl import thumbnail_path
from recsketch.features.backbones import VGG16Backbone
from recsketch.features.chunks import ChunkStore
from recsketch.features.images import load_image
from recsketch.features.keys import backbone_key
from recsketch.similarity import top_k_cosine
from recsketch.stages.common import run_dir
from recsketch.stages.crawl import crawl_stage
from recsketch.stages.extract import extract_stage, plan_stage
from recsketch.stages.threshold import threshold_stage


def prepared(settings: Settings) -> tuple[Path, list[str]]:
    folder = run_dir(settings, "r")
    crawl_stage(settings, folder)
    threshold_stage(settings, folder)
    return folder, plan_stage(settings, folder)


def test_sigkill_mid_extraction_reuses_every_finished_chunk(sketchfab, tmp_path: Path) -> None:
    killed = Settings(data_dir=tmp_path / "killed", sketchfab_url=sketchfab.url, chunk_size=8)
    _, chunk_ids = prepared(killed)
    assert len(chunk_ids) == 9
    env = {**os.environ, "RECSKETCH_DATA_DIR": str(killed.data_dir), "RECSKETCH_SKETCHFAB_URL": sketchfab.url,
           "RECSKETCH_CHUNK_SIZE": "8"}
    command = [sys.executable, "-m", "recsketch.cli", "extract", "--run-id", "r"]
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chunks = killed.features_dir
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(chunks.rglob("chunk-*.npz"))) < 3:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.rglob("chunk-*.npz")}
    assert 3 <= len(before) < 9, "the kill must land mid-way"

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunks.rglob("chunk-*.npz")}
    assert len(after) == 9
    assert {name: after[name] for name in before} == before  # same files: nothing redone
    assert not list(chunks.rglob(".*.tmp"))  # the killed chunk left no usable half-file behind

    # the result equals an uninterrupted run
    clean = Settings(data_dir=tmp_path / "clean", sketchfab_url=sketchfab.url, chunk_size=8)
    clean_folder, clean_ids = prepared(clean)
    for chunk_id in clean_ids:
        extract_stage(clean, clean_folder, chunk_id)
    key = backbone_key(clean)
    valid = ValidModels.read(run_dir(killed, "r")).versions  # each model at its thumbnail's version
    mids_a, feats_a, _ = ChunkStore(killed.features_dir, key).load_features(valid)
    mids_b, feats_b, _ = ChunkStore(clean.features_dir, key).load_features(valid)
    assert mids_a == mids_b and len(mids_a) == 72
    np.testing.assert_allclose(feats_a, feats_b, rtol=1e-4, atol=1e-5)


def test_vgg16_bfloat16_finds_the_same_neighbours_as_float32(sketchfab, demo_groups, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", sketchfab_url=sketchfab.url)
    crawl_stage(settings, run_dir(settings, "r"))
    mids = sorted(demo_groups)
    images = np.stack([load_image(thumbnail_path(settings, m), 224) for m in mids])
    fp32 = VGG16Backbone(weights="random", seed=3, precision="float32").embed(images)
    bf16 = VGG16Backbone(weights="random", seed=3, precision="bfloat16").embed(images)
    assert fp32.shape == bf16.shape == (72, 25_088)
    top_fp32, _ = top_k_cosine(fp32, 10)
    top_bf16, _ = top_k_cosine(bf16, 10)
    shared = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_fp32, top_bf16, strict=True)])
    assert shared >= 0.95, f"only {shared:.1%} of top-10 neighbours agree"


def test_lite0_bfloat16_keeps_the_neighbours(sketchfab, demo_groups, tmp_path: Path) -> None:
    from recsketch.features.backbones import EfficientNetLite0Backbone

    settings = Settings(data_dir=tmp_path / "data", sketchfab_url=sketchfab.url)
    crawl_stage(settings, run_dir(settings, "r"))
    mids = sorted(demo_groups)
    images = np.stack([load_image(thumbnail_path(settings, m), 224) for m in mids])
    fp32 = EfficientNetLite0Backbone().embed(images)
    bf16_backbone = EfficientNetLite0Backbone(precision="bfloat16")
    bf16 = np.concatenate([bf16_backbone.embed(images[i : i + 4]) for i in range(0, len(images), 4)])
    assert bf16.dtype == np.float32 and bf16_backbone.key == "efficientnet_lite0-avg-bfloat16-imagenet"
    top_fp32, _ = top_k_cosine(fp32, 10)
    top_bf16, _ = top_k_cosine(bf16, 10)
    shared = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_fp32, top_bf16, strict=True)])
    assert shared >= 0.95, f"only {shared:.1%} of top-10 neighbours agree"
    assert all(demo_groups[mids[top_bf16[i, 0]]] == demo_groups[m] for i, m in enumerate(mids))
