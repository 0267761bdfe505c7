"""cirlab.evaluation.blind: the three blind-setting studies of TASNet section 4.3 as numbers.

Each number is checked on restorers built so that the answer is known (an oracle that returns
the reference, a restorer linear in the level, one that jumps at one level, one that blurs more
at higher levels), the references against independent degradation calls, the files for being
written, and the studies once on tiny real checkpoints of every kind they take."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cirlab.data.degradations import degrade, gaussian_blur
from cirlab.evaluation.blind import run_artifacts, run_modulation, run_oversmoothing, run_protocol, run_study
from cirlab.evaluation.blind_config import ArtifactsConfig, ModulationConfig, OversmoothingConfig, protocol_config
from cirlab.evaluation.blind_measures import (
    detail_loss,
    hf_energy,
    hf_excess,
    load_clean_images,
    noise_field,
    relative_targets,
    step_changes,
)

REPO = Path(__file__).resolve().parents[1]
CROP = 32


def photos() -> list[tuple[str, torch.Tensor]]:
    """Two textured 8-bit photos (scikit-image's), as (name, uint8 (3, H, W))."""
    from skimage import data

    return [(name, torch.from_numpy(np.ascontiguousarray(getattr(data, name)()[..., :3])).permute(2, 0, 1).contiguous())
            for name in ("astronaut", "coffee")]


def clean_images() -> list[tuple[str, torch.Tensor]]:
    return load_clean_images(photos(), CROP)


class Fake:
    """A restorer whose output is ``fn(image, tasks)``: a constructed case with a known answer."""

    def __init__(self, name, fn):
        self.name, self.kind, self.fn = name, "constructed", fn

    def restore(self, image, tasks):
        return self.fn(image, tasks)

    def flops(self, tasks, height, width):
        return len(tasks) * height * width


def lookup(table: list[tuple[torch.Tensor, object]], image: torch.Tensor):
    """The entry of ``table`` whose input equals ``image`` (the studies' inputs are deterministic)."""
    for key, value in table:
        if torch.equal(key, image):
            return value
    raise AssertionError("the study gave an input the test did not predict")


# --------------------------------------------------------------------------- (a) artifacts
def test_relative_targets_remove_only_the_asked_blur():
    (_, clean), cfg = clean_images()[0], ArtifactsConfig()
    b, n, j = cfg.input_levels
    field = noise_field(clean, 0, 0)
    gt = torch.tensor([[b, n, j], [0.0, n, j], [b / 2, n, j]])
    degraded, targets = relative_targets(clean, (b, n, j), gt, field)
    assert torch.equal(targets[0], degraded[0])  # nothing removed: the input itself
    # all blur removed, noise and JPEG kept: an independent degrade call with the same field
    assert torch.equal(targets[1], degrade(clean, torch.tensor([[0.0, n, j]]), noise_field=field)[0])
    assert torch.equal(targets[2], degrade(clean, torch.tensor([[b / 2, n, j]]), noise_field=field)[0])
    assert hf_energy(targets[1:2]) > hf_energy(targets[2:3]) > hf_energy(degraded)


def oracle_for_artifacts(cfg: ArtifactsConfig, sharpen: float = 0.0) -> Fake:
    """Returns exactly the relative ground truth of each task (``sharpen`` > 0: plus an unsharp mask)."""
    b, n, j = cfg.input_levels
    table = []
    for index, (_, clean) in enumerate(clean_images()):
        gt = torch.tensor([[max(b - t, 0.0), n, j] for t in cfg.levels])
        degraded, targets = relative_targets(clean, (b, n, j), gt, noise_field(clean, cfg.seed, index))
        table.append((degraded, targets))

    def fn(image, tasks):
        targets = lookup(table, image)
        index = [min(range(len(cfg.levels)), key=lambda k: abs(cfg.levels[k] - float(t))) for t in tasks[:, 0]]
        out = targets[index]
        if sharpen:
            out = (out + sharpen * (out - gaussian_blur(out, torch.full((len(out),), 1.0)))).clamp(0, 1)
        return out

    return Fake("sharpened" if sharpen else "oracle", fn)


def test_artifacts_oracle_scores_zero_excess_and_sharpening_does_not():
    cfg = ArtifactsConfig(crop=CROP)
    identity = Fake("identity", lambda image, tasks: image.expand(len(tasks), -1, -1, -1))
    result = run_artifacts([oracle_for_artifacts(cfg), oracle_for_artifacts(cfg, 1.5), identity], photos(), cfg)
    oracle, sharp, ident = (result.per_level[m] for m in ("oracle", "sharpened", "identity"))
    assert oracle["hf_excess"] == [0.0] * len(cfg.levels) and oracle["psnr"] == [100.0] * len(cfg.levels)
    assert result.summary["oracle"]["hf_excess_mean"] == 0.0
    assert all(v > 0.3 for v in sharp["hf_excess"]) and all(v < 45 for v in sharp["psnr"])
    # returning the (blurrier) input adds almost no high frequencies (its noise and JPEG blocks are
    # the target's; JPEG of a blurrier image can ring a little more), and drifts from the target
    assert max(ident["hf_excess"]) < 0.02
    assert ident["psnr"][0] == 100.0 and all(a > b for a, b in zip(ident["psnr"], ident["psnr"][1:]))
    assert len(result.rows) == 2 * 3 * len(cfg.levels)


# --------------------------------------------------------------------------- (b) modulation
def test_step_changes_measure_evenness():
    x = torch.rand(1, 3, 8, 8)
    linear = torch.cat([x * (1 - 0.5 * t) + 0.25 * t for t in torch.linspace(0, 1, 11).tolist()])
    d, cv = step_changes(linear)
    assert d.shape == (10,) and cv < 1e-6
    jump = torch.cat([x if k < 5 else 1 - x for k in range(11)])
    d, cv = step_changes(jump)
    assert int((d > 0).sum()) == 1 and cv == pytest.approx(3.0)  # sqrt(K - 1) for one jump in K steps
    assert math.isnan(step_changes(x.expand(4, -1, -1, -1))[1])


def test_modulation_cv_is_zero_for_a_linear_restorer_and_large_for_a_jump():
    cfg = ModulationConfig(crop=CROP)
    linear = Fake("linear", lambda image, tasks: image * (1 - 0.5 * tasks[:, :1, None, None]) + 0.25 * tasks[:, :1, None, None])
    jump = Fake("jump", lambda image, tasks: torch.where(tasks[:, :1, None, None] < 0.45, image, 1 - image))
    still = Fake("still", lambda image, tasks: image.expand(len(tasks), -1, -1, -1))
    result = run_modulation([linear, jump, still], photos(), cfg)
    assert result.summary["linear"]["cv"] < 1e-6
    assert result.per_level["linear"]["step_share"] == pytest.approx([0.1] * 10)
    assert result.summary["jump"]["cv"] == pytest.approx(3.0) and result.summary["jump"]["max_step_share"] == 1.0
    assert math.isnan(result.summary["still"]["cv"]) and result.summary["still"]["total_change"] == 0.0
    assert result.x == pytest.approx([0.1 * k for k in range(1, 11)])


# --------------------------------------------------------------------------- (c) over-smoothing
def oracle_for_noise(cfg: OversmoothingConfig, blur_per_level: float) -> Fake:
    """The clean image at the true level, blurred by ``blur_per_level`` px per 0.1 above it."""
    table = [(degrade(clean, torch.tensor([[0.0, cfg.sigma / 50, 0.0]]), noise_field=noise_field(clean, cfg.seed, i)),
              clean) for i, (_, clean) in enumerate(clean_images())]

    def fn(image, tasks):
        clean = lookup(table, image)
        radius = (tasks[:, 1] - cfg.levels[0]).clamp_min(0) * 10 * blur_per_level
        return gaussian_blur(clean.expand(len(tasks), -1, -1, -1).contiguous(), radius)

    return Fake(f"blur{blur_per_level}", fn)


def test_oversmoothing_detail_loss_grows_for_a_restorer_that_blurs_more_at_higher_levels():
    cfg = OversmoothingConfig(crop=CROP)
    result = run_oversmoothing([oracle_for_noise(cfg, 0.4), oracle_for_noise(cfg, 0.0)], photos(), cfg)
    smooth, exact = result.per_level["blur0.4"], result.per_level["blur0.0"]
    assert exact["psnr"] == [100.0] * len(cfg.levels) and exact["detail_loss"] == [0.0] * len(cfg.levels)
    assert smooth["psnr"][0] == 100.0 and smooth["detail_loss"][0] == 0.0 and smooth["psnr_delta"][0] == 0.0
    assert all(a < b for a, b in zip(smooth["detail_loss"], smooth["detail_loss"][1:]))
    assert all(a > b for a, b in zip(smooth["psnr"], smooth["psnr"][1:]))
    summary = result.summary["blur0.4"]
    assert summary["psnr_drop"] > 10 and 0.5 < summary["detail_loss_top"] <= 1.0
    assert summary["psnr_drop"] == pytest.approx(-smooth["psnr_delta"][-1])


def test_hf_measures_on_known_images():
    flat = torch.full((1, 3, 16, 16), 0.5)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(1, 3, 16, 16)
    assert float(hf_energy(flat)) == 0.0 and float(hf_energy(checker)) == pytest.approx((4 * 255) ** 2)
    assert float(hf_excess(checker, checker)) == 0.0 and math.isnan(float(hf_excess(checker, flat)))
    half = 0.5 * checker + 0.25  # half the amplitude: a quarter of the energy
    assert float(hf_excess(checker, half)) == pytest.approx(3.0, rel=0.02)


def test_detail_loss_sees_smoothing_through_leftover_noise():
    (_, clean) = clean_images()[0]
    field = noise_field(clean, 0, 0)
    noisy = degrade(clean, torch.tensor([[0.0, 0.3, 0.0]]), noise_field=field)
    ratio, kept, loss = detail_loss(noisy, clean)
    assert float(ratio) > 1.5 and abs(float(kept) - 1) < 0.1 and float(loss) < 0.1  # noise is no lost detail
    # detail smoothed away but the noise left in: the energy ratio still exceeds 1, the loss shows
    smoothed = (gaussian_blur(clean, torch.tensor([1.5])) + (noisy - clean)).clamp(0, 1)
    ratio, kept, loss = detail_loss(smoothed, clean)
    assert float(ratio) > 1.0 and float(loss) > 0.4
    assert float(detail_loss(clean, clean)[2]) == 0.0


# --------------------------------------------------------------------------- files, configs
def test_studies_write_every_file_and_are_deterministic(tmp_path):
    models = [Fake("id", lambda image, tasks: image.expand(len(tasks), -1, -1, -1)),
              Fake("dark", lambda image, tasks: image * (1 - 0.3 * tasks.sum(1)[:, None, None, None]))]
    for study, settings in (("artifacts", {}), ("modulation", {"levels": [0, 0.5, 1]}), ("oversmoothing", {})):
        out = tmp_path / study
        result = run_study(study, models, photos(), {"crop": CROP, "strips": 1, **settings}, out_dir=out)
        rows = (out / f"blind_{study}_per_image.csv").read_text().splitlines()
        steps = len(result.x)
        assert len(rows) == 1 + 2 * 2 * steps and rows[0].startswith("image,model,level")
        summary = json.loads((out / f"blind_{study}.json").read_text())
        assert summary["models"] == ["id", "dark"] and set(summary["summary"]) == {"id", "dark"}
        assert all(len(v) == steps for v in summary["per_level"]["dark"].values())
        assert summary["summary"]["dark"]["gflops_per_inference"] == pytest.approx(CROP * CROP / 1e9)
        text = (out / f"blind_{study}.md").read_text()
        assert "| dark | constructed |" in text and "| id |" in text
        for png in [out / f"blind_{study}.png", out / f"blind_{study}_strips" / "astronaut.png"]:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (out / f"blind_{study}_strips" / "coffee.png").exists()  # strips: 1
        assert not list(out.rglob(".*.tmp"))
        if study == "modulation":
            assert (out / "blind_modulation_per_image_summary.csv").read_text().splitlines()[0] == "image,model,cv,total_change"
            assert "Note: id moved less than 1 grey level" in text  # the identity never modulates
        again = run_study(study, models, photos(), {"crop": CROP, "strips": 0, **settings})
        assert again.rows == result.rows


def test_protocol_files_load_and_bad_settings_name_their_key():
    for study in ("artifacts", "modulation", "oversmoothing"):
        protocol = OmegaConf.load(REPO / "conf" / "protocol" / f"blind_{study}.yaml")
        assert protocol.name == f"blind_{study}"
        name, cfg = protocol_config(protocol)
        assert name == study and cfg.levels == tuple(float(v) for v in protocol.levels)
    assert ModulationConfig().levels == pytest.approx([0.1 * k for k in range(11)])
    with pytest.raises(ValueError, match=r"protocol.levels\[2\]: deblur level 0.6 exceeds"):
        ArtifactsConfig(blur=2.0, levels=(0.0, 0.25, 0.6))
    with pytest.raises(ValueError, match="protocol.levels: .* evenly spaced"):
        ModulationConfig(levels=(0.0, 0.1, 0.3))
    with pytest.raises(ValueError, match=r"protocol.levels\[0\]: 0.4 must be the true noise level"):
        OversmoothingConfig(sigma=15, levels=(0.4, 0.5))
    with pytest.raises(ValueError, match="protocol.quality"):
        protocol_config({"study": "modulation", "quality": 30})
    with pytest.raises(ValueError, match="protocol.study='blurry'"):
        protocol_config({"study": "blurry"})
    with pytest.raises(ValueError, match="model names must differ"):
        run_modulation([Fake("a", None), Fake("a", None)], photos(), ModulationConfig(crop=CROP))


# --------------------------------------------------------------------------- real checkpoints
def test_studies_run_on_tiny_real_checkpoints(tmp_path):
    from cirlab.evaluation.restorers import load_restorer
    from eval_testing import make_checkpoint

    kinds = ("cresmd", "tasnet", "tasnet_finetune", "hyperres_3d")
    models = [load_restorer(f"{kind}={make_checkpoint(kind, tmp_path / kind)}") for kind in kinds]
    denoiser = load_restorer(f"hyperres={make_checkpoint('hyperres', tmp_path / 'hyperres')}")
    images = photos()[:1]
    small = {"crop": 24, "strips": 1}
    for study in ("artifacts", "modulation"):
        result = run_study(study, models, images, {**small, "levels": [0.0, 0.25, 0.5]}, out_dir=tmp_path / study)
        assert set(result.summary) == set(kinds)
        assert all(result.summary[k]["gflops_per_inference"] > 0 for k in kinds)
    result = run_protocol({"name": "blind_oversmoothing", "study": "oversmoothing", "levels": [0.3, 0.6, 1.0], **small},
                          [*models, denoiser], images, out_dir=tmp_path / "oversmoothing")
    assert all(math.isfinite(result.summary[m]["psnr_true"]) for m in result.models)
    # a scalar denoising HyperRes cannot take deblur task vectors: refused before any work
    with pytest.raises(ValueError, match="hyperres: a scalar-level HyperRes"):
        run_modulation([denoiser], "/nonexistent/folder", ModulationConfig())


def test_study_logs_tables_and_images_to_an_offline_wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="cirlab-test")
    try:
        model = Fake("id", lambda image, tasks: image.expand(len(tasks), -1, -1, -1))
        run_modulation([model], photos(), ModulationConfig(crop=CROP, levels=(0.0, 0.5, 1.0)), out_dir=tmp_path / "m")
        logged = dict(run.summary)
    finally:
        wandb.finish()
    assert {"blind_modulation/per_level", "blind_modulation/summary", "blind_modulation/plot",
            "blind_modulation/strip/astronaut"} <= set(logged)
    media = list((Path(run.dir) / "media").rglob("*"))
    assert any(p.suffix == ".json" and "table" in p.as_posix() for p in media)
    assert any(p.suffix == ".png" for p in media)
    assert "wandb" not in sys.modules or sys.modules["wandb"].run is None


def test_cirlab_eval_runs_each_blind_protocol_into_one_comparison(tmp_path):
    from PIL import Image

    from cirlab.evaluation.compare import run_eval
    from conftest import compose
    from eval_testing import make_checkpoint

    images = tmp_path / "images"
    images.mkdir()
    for name, photo in photos():
        Image.fromarray(photo[:, :40, :40].permute(1, 2, 0).numpy()).save(images / f"{name}.png")
    cresmd, tasnet = make_checkpoint("cresmd", tmp_path / "a"), make_checkpoint("tasnet", tmp_path / "b")
    expected = {"artifacts": "hf_excess_mean", "modulation": "cv", "oversmoothing": "psnr_mean"}
    for study, column in expected.items():
        levels = "[0.3,0.6,1.0]" if study == "oversmoothing" else "[0.0,0.25,0.5]"
        cfg = compose("eval", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", "device=cpu",
                               f"hydra.run.dir={tmp_path / study}", f"protocol=blind_{study}", f"images={images}",
                               f"models={{CResMD:{cresmd},TASNet:{tasnet}}}", f"protocol.levels={levels}",
                               "protocol.crop=24", "protocol.max_images=1", "protocol.strips=1"])
        result = run_eval(cfg)
        out = Path(cfg.paths.output_dir)
        assert result.comparison.metrics[0] == column
        table = (out / "comparison.md").read_text()
        assert "| CResMD | cresmd |" in table and "| TASNet | tasnet |" in table and column in table
        data = json.loads((out / f"blind_{study}.json").read_text())
        assert data["images"] == ["astronaut"] and data["config"]["levels"] == json.loads(levels)
        assert (out / f"blind_{study}_strips" / "astronaut.png").exists()
        assert result.comparison.workload["tasks"] == 3 and result.comparison.flops["CResMD"] > 0
