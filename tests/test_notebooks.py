"""The notebooks people run (notebooks/*.ipynb) and the library behind the modulation explorer.

* ``cirlab.modulation_explorer``: TASNet's prefix runs once across renders and slider moves, and
  every output equals :func:`cirlab.inference.restore`; FLOPs are the analytic ones.
* Both notebooks execute headless (nbclient, the interpreter running the tests as kernel) on tiny
  real checkpoints and outputs: paths go in by replacing the cell tagged ``parameters``; the
  widgets are driven by setting slider values in an added cell.
* Committed notebooks carry no outputs and no execution counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from cirlab.archs.flops import cresmd_flops
from cirlab.inference import restore
from cirlab.modulation_explorer import SLIDERS, ModulationExplorer, explorer_widget
from conftest import REPO_ROOT
from eval_testing import make_checkpoint
from tasnet_testing import NB, NF

NOTEBOOKS = REPO_ROOT / "notebooks"
TASKS = [[0.0, 0.0, 0.0], [0.2, 0.5, 0.1], [1.0, 1.0, 1.0], [0.2, 0.5, 0.1]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nb-ckpts")
    return {kind: make_checkpoint(kind, folder / kind, seed=i + 1)
            for i, kind in enumerate(("cresmd", "tasnet", "tsnet_search"))}


# --------------------------------------------------------------------------- the explorer library
def test_prefix_runs_once_per_image_and_outputs_equal_restore(checkpoints):
    image = torch.rand(3, 21, 30)  # odd height: padded for the network, cropped back
    explorer = ModulationExplorer(checkpoints["cresmd"], checkpoints["tasnet"], image)
    tasnet = explorer.tasnet
    assert tasnet.shared_maps > 0 and tasnet.runtime.prefix_calls == 0
    renders = [explorer.render(t) for t in TASKS]
    assert tasnet.runtime.prefix_calls == 1
    for t, rendering in zip(TASKS, renders):
        task = torch.tensor([t])
        for name, ckpt in (("TASNet", checkpoints["tasnet"]), ("CResMD", checkpoints["cresmd"])):
            expected = restore(ckpt, image, task).clamp(0, 1)[0]
            assert rendering.images[name].shape == (3, 21, 30)
            assert torch.allclose(rendering.images[name], expected, atol=1e-5), (name, t)
        cost = tasnet.cost(task, 21, 30)
        assert rendering.flops["TASNet"] == cost["total"] == tasnet.flops(task, 21, 30)
        assert rendering.flops["CResMD"] == rendering.flops_this_render["CResMD"] == cresmd_flops(NF, NB, 21, 30)
    # the first render paid for the prefix, later ones only for their task-specific part
    assert renders[0].flops_this_render["TASNet"] == renders[0].flops["TASNet"]
    for t, rendering in zip(TASKS[1:], renders[1:]):
        cost = tasnet.cost(torch.tensor([t]), 21, 30)
        assert rendering.flops_this_render["TASNet"] == cost["per_task"][0] < cost["total"]
    # a different task vector gives a different output (the sliders do something)
    assert not torch.equal(renders[0].images["TASNet"], renders[2].images["TASNet"])

    explorer.set_image(torch.rand(3, 16, 18))  # a new image: its prefix once
    explorer.render(TASKS[1])
    explorer.render(TASKS[2])
    assert tasnet.runtime.prefix_calls == 2


def test_widget_sliders_render_without_recomputing_the_prefix(checkpoints):
    explorer = ModulationExplorer(None, checkpoints["tasnet"], torch.rand(3, 16, 20))
    ui = explorer_widget(explorer)
    assert set(ui.sliders) == set(SLIDERS) and set(ui.pictures) == {"input", "TASNet"}
    first = ui.pictures["TASNet"].value
    ui.sliders["denoise"].value = 0.6
    ui.sliders["deblur"].value = 0.3
    assert ui.last.task.tolist() == pytest.approx([0.3, 0.6, 0.0])
    assert ui.pictures["TASNet"].value != first and ui.pictures["TASNet"].value[:4] == b"\x89PNG"
    assert "TASNet:" in ui.label.value and "GFLOPs" in ui.label.value
    assert explorer.tasnet.runtime.prefix_calls == 1


def test_bad_inputs_are_named(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="needs a CResMD or a TASNet"):
        ModulationExplorer(None, None)
    with pytest.raises(ValueError, match="tasnet: expected a TASNet checkpoint, got a CResMDNet"):
        ModulationExplorer(None, checkpoints["cresmd"])
    explorer = ModulationExplorer(checkpoints["cresmd"], None, torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="task: task vector 0"):
        explorer.render([0.0, 1.5, 0.0])
    with pytest.raises(ValueError, match=r"image: expected \(3, H, W\)"):
        explorer.set_image(torch.rand(8, 8))
    with pytest.raises(Exception, match="missing.png"):
        explorer.set_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- executing the notebooks
def execute(name: str, parameters: dict, extra_cells: list[str] = (), cwd: Path | None = None):
    """Run ``notebooks/<name>`` headless with its ``parameters`` cell replaced by ``parameters``
    (name -> Python expression) and ``extra_cells`` appended; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "from pathlib import Path\n" + "\n".join(f"{k} = {v}" for k, v in parameters.items())
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in
                       ["import sys\nprint('KERNEL', sys.executable)", *extra_cells]]
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or NOTEBOOKS)}}).execute()
    return notebook


def text_of(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            data = output.get("data", {})
            parts.append(data.get("text/plain", "") + data.get("text/markdown", "") + data.get("text/html", ""))
    return "\n".join(parts)


def images_in(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_modulation_explorer_notebook_runs_and_its_sliders_move(checkpoints, tmp_path):
    from PIL import Image

    picture = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 52, 3) * 255).byte().numpy()).save(picture)
    # the checkpoints as a pipeline run lists them (the notebook's default source); CResMD given explicitly wins
    manifest = tmp_path / "pipeline.json"
    manifest.write_text(json.dumps({"products": {"cresmd_ckpt": str(tmp_path / "absent.ckpt"),
                                                 "tasnet_ckpt": str(checkpoints["tasnet"])}}))
    notebook = execute("modulation_explorer.ipynb",
                       {"CRESMD_CKPT": repr(str(checkpoints["cresmd"])), "TASNET_CKPT": None,
                        "PIPELINE_JSON": repr(str(manifest)), "IMAGE": repr(str(picture)), "LEVELS": (1.0, 20.0, 40.0), "CROP": 32,
                        "SEED": 0},
                       ["import json as _json\nui.sliders['denoise'].value = 0.9\nui.sliders['dejpeg'].value = 0.2\n"
                        "same = torch.equal(ui.last.images['TASNet'], explorer.render(ui.last.task.tolist()).images['TASNet'])\n"
                        "print('SLIDERS', _json.dumps({'task': ui.last.task.tolist(), 'same': same, "
                        "'prefix_calls': explorer.tasnet.runtime.prefix_calls}))"],
                       cwd=tmp_path)
    text = text_of(notebook)
    assert f"KERNEL {sys.executable}" in text  # the kernel is the interpreter running the tests
    assert "image: (3, 32, 32)" in text
    assert f"CResMD: {checkpoints['cresmd']}" in text and f"TASNet: {checkpoints['tasnet']}" in text
    state = json.loads(text.split("SLIDERS ")[1].splitlines()[0])
    assert state["task"] == pytest.approx([0.25, 0.9, 0.2])  # deblur starts at the input's true level, r = 1
    assert state["same"]
    # the prefix ran once: the widget's first render, the slider moves and the static figure reuse it
    assert state["prefix_calls"] == 1 and "TASNet prefix runs so far: 1" in text
    assert images_in(notebook) >= 1  # the static side-by-side figure
    assert "application/vnd.jupyter.widget-view+json" in json.dumps([c.get("outputs") for c in notebook.cells])


@pytest.fixture(scope="module")
def outputs(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Tiny real outputs of cirlab-eval (grid comparison), cirlab-bench cost and a blind study."""
    from cirlab.bench.cost import bench_cost
    from cirlab.bench.records import write_cost_outputs
    from cirlab.checkpoints import load_network
    from cirlab.evaluation.blind import run_study
    from cirlab.evaluation.compare import run_eval
    from cirlab.evaluation.restorers import load_restorer
    from conftest import compose
    from test_eval import write_images

    root = tmp_path_factory.mktemp("nb-outputs")
    images = write_images(root / "images", count=1)
    models = f"models={{CResMD:{checkpoints['cresmd']},TSNet:{checkpoints['tsnet_search']},TASNet:{checkpoints['tasnet']}}}"
    cfg = compose("eval", [f"paths.root_dir={root}", f"paths.cache_dir={root / 'cache'}", "device=cpu",
                           f"hydra.run.dir={root / 'eval'}", f"images={images}", models])
    run_eval(cfg)
    nets = {"CResMD": load_network(checkpoints["cresmd"]), "TASNet": load_network(checkpoints["tasnet"])}
    record = bench_cost(nets, [(16, 24)], repeats=1, warmup=0, threads=(None,), device="cpu")
    write_cost_outputs(record, root / "cost", "test_notebooks", [])
    restorers = [load_restorer(f"{name}={checkpoints[kind]}") for name, kind in (("CResMD", "cresmd"), ("TASNet", "tasnet"))]
    from skimage import data

    photo = torch.from_numpy(data.astronaut()[:64, :64].copy()).permute(2, 0, 1).contiguous()
    run_study("modulation", restorers, [("astronaut", photo)], {"crop": 24, "strips": 0, "levels": [0.0, 0.5, 1.0]},
              out_dir=root / "blind")
    return {"comparison": Path(cfg.paths.output_dir) / "comparison.json", "cost": root / "cost" / "cost.json",
            "blind": root / "blind" / "blind_modulation.json"}


def test_results_notebook_draws_tables_and_figures_from_the_outputs(outputs, tmp_path):
    for path in outputs.values():
        assert path.is_file(), path
    comparison = json.loads(outputs["comparison"].read_text())
    notebook = execute("results.ipynb",
                       {"PIPELINE_JSON": None, "COST_JSON": repr(str(outputs["cost"])),
                        "COMPARISON_JSON": repr(str(outputs["comparison"])), "TABLE4_COMPARISON_JSON": None,
                        "BLIND_JSONS": repr([str(outputs["blind"])])}, cwd=tmp_path)
    text = text_of(notebook)
    assert "**16x24**" in text  # Table 1, one block per resolution
    psnr = {m["name"]: m["psnr"] for m in comparison["models"]}
    for name in ("CResMD", "TSNet", "TASNet"):
        assert f"{psnr[name]:.6f}"[:6] in text  # Tables 2-3 show the measured PSNRs
    assert "Table 2: not available" not in text and "Table 3 (needs" not in text
    assert "**Table 4: not available**" in text  # no absolute-GT comparison given
    assert images_in(notebook) == 2  # Figure 10 (one study) and Figure 11


def test_results_notebook_finds_a_pipeline_runs_outputs_and_names_the_missing_ones(outputs, tmp_path):
    import shutil

    run_dir = tmp_path / "run"  # a pipeline run whose evaluate stage finished and whose bench stage did not
    (run_dir / "evaluate").mkdir(parents=True)
    shutil.copy(outputs["comparison"], run_dir / "evaluate" / "comparison.json")
    (run_dir / "pipeline.json").write_text(json.dumps({"run_dir": str(run_dir), "stages": {}, "products": {}}))
    notebook = execute("results.ipynb", {"PIPELINE_JSON": repr(str(run_dir / "pipeline.json")), "COST_JSON": None,
                                         "COMPARISON_JSON": None, "TABLE4_COMPARISON_JSON": None, "BLIND_JSONS": []},
                       cwd=tmp_path)
    text = text_of(notebook)
    for what in ("Table 1", "Table 4", "Figure 10", "Figure 11"):
        assert f"**{what}: not available**" in text
    assert "Table 2: not available" not in text and "Table 3 (needs" not in text
    psnr = {m["name"]: m["psnr"] for m in json.loads(outputs["comparison"].read_text())["models"]}
    assert f"{psnr['TSNet']:.6f}"[:6] in text
    assert images_in(notebook) == 0


# --------------------------------------------------------------------------- committed notebooks
def test_committed_notebooks_have_no_outputs():
    import subprocess

    import nbformat

    listed = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO_ROOT, capture_output=True, text=True)
    paths = {REPO_ROOT / p for p in listed.stdout.split()} if listed.returncode == 0 else set()
    paths |= set(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= {"inspect_run.ipynb", "modulation_explorer.ipynb", "results.ipynb"}
    for path in sorted(paths):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name} cell {index} has outputs: clear them before committing"
                assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
