"""The config tree composes, and bad values fail at composition with the key in the message."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cirlab.config import validate_config
from conftest import CONFIG_DIR, compose


def resolve_all(cfg):
    """Resolve every interpolation of the job's config (Hydra's own node has run-time values)."""
    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
            for key in cfg if key != "hydra"}


def _is_pipeline_experiment(path: Path) -> bool:
    return any(line.startswith("pipeline:") for line in path.read_text().splitlines())


# experiments of one training job; pipeline experiments (pipeline.* keys) are tested in test_pipeline.py
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not _is_pipeline_experiment(p))
PIPELINE_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if _is_pipeline_experiment(p))
GROUP_OPTIONS = [
    (group, p.stem)
    for group in ("data", "degradation", "sampling", "model", "trainer", "logger", "callbacks", "debug", "hparams_search")
    for p in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment):
    cfg = compose("train", [f"experiment={experiment}"])
    validate_config(cfg)
    resolve_all(cfg)
    assert cfg.model._target_.startswith("cirlab.")


def test_the_experiment_folder_holds_both_kinds():
    assert "cresmd_paper" in EXPERIMENTS and PIPELINE_EXPERIMENTS == ["tasnet_paper"]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = compose("train", [f"{group}={option}"])
    validate_config(cfg)
    resolve_all(cfg)


def test_eval_config_requires_ckpt_path():
    from cirlab.evaluation.compare import model_specs

    cfg = compose("eval", [])
    validate_config(cfg)
    with pytest.raises(ValueError, match="ckpt_path"):  # cirlab-eval asks for ckpt_path or models
        model_specs(cfg)


def test_paper_recipe_matches_method_md():
    cfg = compose("train", ["experiment=cresmd_paper"])
    assert (cfg.model.net.nf, cfg.model.net.nb, cfg.model.net.cond_dim) == (64, 32, 3)
    assert cfg.model.optimizer.lr == 5e-4 and list(cfg.model.optimizer.betas) == [0.9, 0.99]
    assert list(cfg.model.scheduler.milestones) == [200000, 400000, 600000, 800000]
    assert cfg.model.scheduler.gamma == 0.5 and cfg.trainer.max_steps == 1_000_000
    assert (cfg.data.batch_size, cfg.data.patch_size) == (16, 64)
    assert cfg.sampling.ground_truth == "absolute" and cfg.sampling.distribution == "beta"
    assert Path(cfg.data.train_dir).parts[-2:] == ("DIV2K", "DIV2K_train_HR")


def test_misspelt_typed_key_fails_at_composition():
    with pytest.raises(Exception, match="blur_radus"):
        compose("train", ["degradation.blur_radus=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="p_binary"):
        compose("train", ["sampling.p_binary=often"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("sampling.p_binary=1.5", "p_binary"),
        ("sampling.p_multiple=-0.1", "p_multiple"),
        ("degradation.noise_sigma_max=80", "noise_sigma_max"),
        ("degradation.blur_radius_max=5", "blur_radius_max"),
        ("degradation.jpeg_quality_min=5", "jpeg_quality_min"),
        ("sampling.ground_truth=sideways", "ground_truth"),
        ("sampling.distribution=normal", "distribution"),
    ],
)
def test_out_of_range_values_fail_before_anything_is_built(override, key):
    cfg = compose("train", [override])
    with pytest.raises(ValueError, match=key):
        validate_config(cfg)


# ------------------------------------------------ values that pass the types but mean something else (issue 15.4)
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.val_max_images=-1"], "data.val_max_images=-1"),  # was a slice: 1 of 2 images
        (["data.val_max_images=0"], "data.val_max_images=0"),  # was: ran and scored nothing
        (["data.test_max_images=0"], "data.test_max_images=0"),
        (["data.val_crop=-10"], "data.val_crop=-10"),  # was: failed deep in generation
        (["data.test_crop=0"], "data.test_crop=0"),
        (["data=hyperres_denoise", "model=hyperres_tiny", "data.val_max_images=-1"], "data.val_max_images=-1"),
        (["model.optimizer.lr=-0.001"], "model.optimizer.lr=-0.001"),  # was: torch's error without the key
        (["model.optimizer.lr=0"], "model.optimizer.lr=0"),  # would never train
        (["model=tasnet_search_tiny", "model.controller_lr=-1"], "model.controller_lr=-1"),
        (["+model.optimizer.weight_decay=-0.1"], "model.optimizer.weight_decay=-0.1"),
        (["model.optimizer.betas=[0.9,1.5]"], "model.optimizer.betas"),
        (["model=cresmd", "model.scheduler.gamma=-0.5"], "model.scheduler.gamma=-0.5"),
        (["model=cresmd", "model.scheduler.milestones=[400,200]"], "model.scheduler.milestones"),
        (["trainer.max_steps=0"], "trainer.max_steps=0"),  # was: ran, wrote results, only warnings
        (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
        (["trainer.max_steps=-1"], "trainer.max_steps=-1 with trainer.max_epochs=-1"),  # forever
        (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0"),
        (["seed=-3"], "seed=-3"),
        (["data.pairs_on=gpu"], "data.pairs_on='gpu'"),  # was: caught only when the DataModule was built
        (["data.degrade_margin=-2"], "data.degrade_margin=-2"),
        (["data=hyperres_dejpeg", "model=hyperres_tiny", "data.pairs_on=Workers"], "data.pairs_on='Workers'"),
        (["callbacks.last_checkpoint.every_n_train_steps=0"], "callbacks.last_checkpoint.every_n_train_steps=0"),
        (["callbacks.task_grid_picture.crop=0"], "callbacks.task_grid_picture.crop=0"),
        (["callbacks.task_grid_picture.fractions=[0.5,2.0]"], "callbacks.task_grid_picture.fractions"),
        (["callbacks.task_grid_picture.input_levels=[9,30,30]"], "callbacks.task_grid_picture.input_levels"),
    ],
)
def test_values_that_would_mean_something_else_fail_naming_their_key(overrides, key):
    cfg = compose("train", overrides)
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert key in str(info.value)


def test_the_eval_config_checks_its_data_values_but_not_training_steps():
    cfg = compose("eval", ["ckpt_path=x.ckpt", "data.test_max_images=-1"])
    with pytest.raises(ValueError, match=r"data\.test_max_images=-1"):
        validate_config(cfg)
    validate_config(compose("train", ["train=false", "trainer.max_steps=0"]))  # nothing is trained


def test_a_bad_value_stops_a_training_job_before_anything_is_written(train_cfg):
    from cirlab.training import train

    cfg = train_cfg("data.val_max_images=-1")
    with pytest.raises(ValueError, match=r"data\.val_max_images=-1"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists() or not any(Path(cfg.paths.output_dir).iterdir())


def test_an_eval_set_spec_names_the_config_key_of_a_bad_count_or_crop():
    from cirlab.data.evalsets import EvalSetSpec

    with pytest.raises(ValueError, match=r"data\.test_max_images=-1"):
        EvalSetSpec(folder="x", max_images=-1, config_key="data.test_dir")
    with pytest.raises(ValueError, match=r"data\.val_crop=-10"):
        EvalSetSpec(folder="x", crop=-10)


def test_multi_gpu_trainers_train_as_the_single_gpu_one():
    """trainer=ddp and trainer=slurm keep trainer=gpu's numerics (bf16 autocast, cuDNN benchmark)."""
    single = compose("train", ["trainer=gpu"]).trainer
    for option in ("ddp", "slurm"):
        overrides = [f"trainer={option}"] + (["hydra/launcher=slurm"] if option == "slurm" else [])
        trainer = compose("train", overrides).trainer
        assert (trainer.precision, trainer.benchmark, trainer.accelerator) == \
            (single.precision, single.benchmark, single.accelerator), option
