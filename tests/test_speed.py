"""GPU speed options, checked on the CPU: channels_last changes no network's values, bf16 autocast
gives float32 outputs close to float32's, every module trains under ``bf16-mixed`` with
channels_last and evaluates in float32, and ``torch.compile`` compiles the right method (and runs,
for a tiny CResMD, where a C++ compiler is present)."""

from __future__ import annotations

import shutil
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.hyperres import HyperResNet, MainNet
from cirlab.archs.tasnet_search import TASNetSearchNet
from cirlab.callbacks.speed import TrainingSpeed, batch_to_channels_last, compile_training_forward, to_channels_last
from cirlab.derivation import derive
from conftest import compose
from tasnet_testing import search_state

EMBEDDED = ["data.embedded_root=${paths.cache_dir}/embedded", "data.train_dir=${paths.cache_dir}/embedded/train",
            "data.val_dir=${paths.cache_dir}/embedded/heldout", "data.test_dir=${paths.cache_dir}/embedded/heldout"]
TINY_STEPS = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2", "data.batches_per_epoch=2",
              "data.num_workers=0", "data.patch_size=32", "data.batch_size=2", "data.val_max_images=1",
              "data.test_max_images=1", "logger=none", "test=false", "model.test_iqa=false", *EMBEDDED]


def o1_weights(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1)-scale random weights (the reference init is too gentle for a sensitive comparison)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.2))
    return net


def _derived_tasnet():
    net = derive(search_state(3, seed=7))
    return net


# name -> (network factory, call(net, x4d, x5d, task)); every training forward of the modules
NETWORKS = {
    "cresmd": (lambda: o1_weights(CResMDNet(nf=8, nb=2)), lambda n, x, xs, t: n(x, t)),
    "tasnet_search": (lambda: search_state(3, seed=1).train(),
                      lambda n, x, xs, t: n.search_forward(x, t).output),
    "tasnet_search_unshared": (lambda: search_state(0, seed=2).train(),
                               lambda n, x, xs, t: n.search_forward(x, t).output),
    "tasnet_masked": (lambda: _derived_tasnet().train(), lambda n, x, xs, t: n(x, t)),
    "tasnet_sliced": (lambda: _derived_tasnet().eval(), lambda n, x, xs, t: n(x, t)),
    "hyperres_levels": (lambda: o1_weights(HyperResNet(nf=8, nb=2, cond_dim=1)),
                        lambda n, x, xs, t: n.forward_levels(xs, torch.tensor([0.1, 0.6]))),
    "hyperres_mixed": (lambda: o1_weights(HyperResNet(nf=8, nb=2, cond_dim=1)), lambda n, x, xs, t: n(x, t[:, :1])),
    "hyperres_3d": (lambda: o1_weights(HyperResNet(nf=8, nb=2, cond_dim=3)), lambda n, x, xs, t: n(x, t)),
    "mainnet": (lambda: o1_weights(MainNet(nf=8, nb=2)), lambda n, x, xs, t: n(x)),
}


def _inputs(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 20, 22, generator=generator)
    xs = torch.rand(2, 4, 3, 20, 22, generator=generator)
    t = torch.rand(4, 3, generator=generator)
    return x, xs, t


def test_channels_last_helpers_keep_values_and_make_each_image_channels_last():
    x, xs, t = _inputs()
    assert to_channels_last(x).is_contiguous(memory_format=torch.channels_last) and torch.equal(to_channels_last(x), x)
    stacked = to_channels_last(xs)
    assert torch.equal(stacked, xs) and stacked[1].is_contiguous(memory_format=torch.channels_last)
    batch = {"input": x, "inputs": xs, "task": t, "id": torch.arange(4)}
    same = batch_to_channels_last(batch)
    assert same is batch and batch["input"].is_contiguous(memory_format=torch.channels_last)
    assert batch["task"] is t and batch["id"].dtype == torch.long  # 2-D and integer tensors left alone


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_channels_last_leaves_outputs_and_gradients_unchanged(name):
    make, call = NETWORKS[name]
    x, xs, t = _inputs()
    torch.manual_seed(0)
    reference = make()
    torch.manual_seed(0)
    converted = make().to(memory_format=torch.channels_last)
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in converted.parameters())
    out_ref = call(reference, x, xs, t)
    out_cl = call(converted, to_channels_last(x), to_channels_last(xs), t)
    assert out_ref.abs().mean() > 0.05  # a sensitive comparison: outputs are far from zero
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-5, atol=1e-5)
    if name != "tasnet_sliced":  # the sliced runtime is inference only
        out_ref.square().mean().backward()
        out_cl.square().mean().backward()
        grads = [(a.grad, b.grad) for a, b in zip(reference.parameters(), converted.parameters()) if a.grad is not None]
        assert grads
        for a, b in grads:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_bf16_autocast_gives_float32_outputs_close_to_float32(name):
    """Every network's output stays float32 under bf16 autocast (CResMD/TASNet: the image skip
    promotes; HyperRes: conv5 runs in float32), within bf16's precision of the float32 output."""
    make, call = NETWORKS[name]
    x, xs, t = _inputs()
    net = make()
    with torch.no_grad():
        exact = call(net, x, xs, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = call(net, x, xs, t)
    assert mixed.dtype == torch.float32
    error = (mixed - exact).abs().max() / exact.abs().max()
    assert 0 < error < 0.05, f"bf16 relative error {float(error):.3g}"


def _module_overrides(name: str, tmp_path: Path, derived: Path) -> list[str]:
    return {
        "cresmd": ["model=cresmd_tiny", "data.val_crop=32", "data.val_grid=single"],
        "tasnet_search": ["model=tasnet_search_tiny", "model.workload_grid=single", "data.val_crop=32",
                          "data.val_grid=single", "model.decision_samples=8"],
        "tasnet_finetune": ["model=tasnet_finetune", f"model.derived_ckpt={derived}", "data.val_crop=32",
                            "data.val_grid=single"],
        "hyperres": ["data=hyperres_denoise", "model=hyperres_tiny", "data.val_crop=32", "data.val_levels=[15,50]"],
        "hyperres_3d": ["model=hyperres_3d_small", "model.net.nf=8", "model.net.nb=1", "data.val_crop=32",
                        "data.val_grid=single"],
    }[name]


@pytest.fixture(scope="module")
def derived_ckpt(tmp_path_factory) -> Path:
    return _derived_tasnet().save(tmp_path_factory.mktemp("derived") / "tasnet.ckpt")


# each ~10-30 s on 2 loaded cores: two in the fast suite, the rest with the slow tests
@pytest.mark.parametrize("name", [pytest.param("cresmd", marks=pytest.mark.slow),
                                  pytest.param("tasnet_search", marks=pytest.mark.slow), "tasnet_finetune",
                                  pytest.param("hyperres", marks=pytest.mark.slow), "hyperres_3d"])
def test_every_module_trains_in_bf16_with_channels_last_and_validates_in_float32(name, tmp_path, shared_cache,
                                                                                derived_ckpt):
    cfg = compose("train", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}",
                            f"hydra.run.dir={tmp_path / 'run'}", *TINY_STEPS,
                            *_module_overrides(name, tmp_path, derived_ckpt)])
    L.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    speed = TrainingSpeed(channels_last=True)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(next(v for k, v in batch.items() if k in ("input", "inputs")))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(outputs["loss"])

    trainer = hydra.utils.instantiate(cfg.trainer, precision="bf16-mixed", callbacks=[speed, Spy()], logger=False,
                                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 2 and speed.channels_last
    images, loss = seen[0], seen[1]
    image = images if images.ndim == 4 else images[0]
    assert image.is_contiguous(memory_format=torch.channels_last)  # the speed callback ran before the step
    assert torch.isfinite(loss) and loss > 0
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.net.parameters())
    # evaluation runs in float32 whatever the precision: the same scores under bf16-mixed and 32-true
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        # default_root_dir: a search module writes its architecture there (the working directory otherwise)
        evaluator = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                              enable_progress_bar=False, enable_model_summary=False,
                              default_root_dir=trainer.default_root_dir)
        scores[precision] = evaluator.validate(model, datamodule=datamodule, verbose=False)[0]["val/psnr"]
    assert scores["bf16-mixed"] == pytest.approx(scores["32-true"], abs=1e-5)
    # the channels_last weights load into a fresh module (checkpoints unchanged)
    fresh = hydra.utils.instantiate(cfg.model)
    fresh.load_state_dict(model.state_dict())


def test_the_configs_enable_bf16_on_gpu_and_the_speed_callback_everywhere():
    gpu = compose("train", ["trainer=gpu"])
    assert gpu.trainer.precision == "bf16-mixed" and gpu.trainer.benchmark is True
    assert compose("train", []).trainer.precision == "32-true"
    assert compose("train", ["experiment=cresmd_paper"]).trainer.precision == "bf16-mixed"
    speed = compose("train", []).callbacks.speed
    assert speed._target_ == "cirlab.callbacks.speed.TrainingSpeed" and speed.channels_last == "auto"
    assert speed.compile is False


def test_bad_speed_settings_name_their_key():
    with pytest.raises(ValueError, match="callbacks.speed.channels_last"):
        TrainingSpeed(channels_last="yes")
    with pytest.raises(ValueError, match="callbacks.speed.compile"):
        TrainingSpeed(compile="true")
    with pytest.raises(ValueError, match="callbacks.speed.float32_matmul_precision"):
        TrainingSpeed(float32_matmul_precision="tf32")


def test_channels_last_auto_is_off_on_the_cpu(tmp_path):
    speed = TrainingSpeed()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module = L.LightningModule()
    module.net = CResMDNet(nf=8, nb=1)
    speed.setup(trainer, module, "fit")
    assert speed.channels_last is False and module.net.conv_first.weight.is_contiguous()


def test_compile_wraps_the_training_forward_and_keeps_parameter_names():
    """``forward`` through nn.Module.compile, another method replaced by its compiled version;
    nothing is compiled until the first call, and the checkpoint keys stay the same."""
    from cirlab.models.hyperres import HyperRes
    from cirlab.models.tasnet_search import TASNetSearch

    assert TASNetSearch.training_forward == "search_forward" and HyperRes.training_forward == "forward_levels"
    for net, method in ((CResMDNet(nf=8, nb=1), "forward"), (TASNetSearchNet(nf=8, nb=1), "search_forward"),
                        (HyperResNet(nf=8, nb=1), "forward_levels")):
        module = L.LightningModule()
        module.net = net
        if method != "forward":
            module.training_forward = method
        keys = list(net.state_dict())
        assert compile_training_forward(module) == method
        assert list(net.state_dict()) == keys
        if method == "forward":
            assert net._compiled_call_impl is not None
        else:
            assert method in vars(net) and getattr(net, method) is not type(net).__dict__[method]
    module = L.LightningModule()
    module.net = CResMDNet(nf=8, nb=1)
    module.training_forward = "no_such_method"
    with pytest.raises(ValueError, match="no method 'no_such_method'"):
        compile_training_forward(module)


@pytest.mark.slow
def test_compiled_cresmd_trains_on_the_cpu_like_eager():
    """torch.compile (inductor, C++ on the CPU) of a tiny CResMD: same loss and gradients as eager."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++/c++), absent here")
    x, _, t = _inputs()
    torch.manual_seed(0)
    eager = o1_weights(CResMDNet(nf=8, nb=1))
    compiled = o1_weights(CResMDNet(nf=8, nb=1))
    module = L.LightningModule()
    module.net = compiled
    compile_training_forward(module)
    losses = []
    for net in (eager, compiled):
        loss = (net(x, t) - x).abs().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: this test trains a tiny module on the GPU "
                    "with bf16-mixed, channels_last (auto: on for CUDA) and torch.compile (scripts/gpu_check.sh)")
def test_bf16_channels_last_and_compile_train_on_cuda(tmp_path, shared_cache):
    cfg = compose("train", [f"paths.root_dir={tmp_path}", f"paths.cache_dir={shared_cache}",
                            f"hydra.run.dir={tmp_path / 'run'}", *TINY_STEPS, "model=cresmd_tiny", "trainer=gpu",
                            "trainer.max_steps=3", "data.batches_per_epoch=3"])
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    speed = TrainingSpeed(compile=True)
    losses = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[speed, Spy()], logger=False, enable_checkpointing=False,
                                      enable_progress_bar=False, limit_val_batches=0)
    assert trainer.precision == "bf16-mixed"
    trainer.fit(model, datamodule=datamodule)
    assert speed.channels_last and speed.compiled == "forward" and len(losses) == 3
    assert all(0 < loss < 1 for loss in losses)
    assert model.net.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
