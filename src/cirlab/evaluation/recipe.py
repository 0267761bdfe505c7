"""The comparison the 3-D HyperRes exists for (``make compare``): CResMD, TASNet and the 3-D
HyperRes trained on the same data at the same scale, scored side by side by ``cirlab-eval``.

Steps, each one of the suite's own commands run as a subprocess in one run folder ``out``:

1. ``pipeline/``: ``cirlab-pipeline pipeline.stages=[cresmd,search,derive,finetune]``: the
   embedded-scale CResMD (relative ground truth, 1,500 steps) and the TASNet searched from it,
   derived and fine-tuned (conf/pipeline.yaml's recipe); the pipeline resumes by itself;
2. ``hyperres_3d/``: ``cirlab-train experiment=hyperres_3d_compare``: the 3-D HyperRes on the
   same pairs (embedded photos, relative ground truth, batch 16 x 64 px, same seed) for the
   CResMD stage's 1,500 steps; its best checkpoint (val/psnr), as the pipeline takes the CResMD's;
3. ``eval/<protocol>/``: ``cirlab-eval protocol=<protocol> models={CResMD:..,TASNet:..,HyperRes3D:..}``
   for each protocol (default: ``grid`` and every ``blind_*`` protocol of ``conf/protocol/``), on
   the pipeline's test images (``data=embedded``: the two held-out photos).

[choice] "The same scale": the same training pairs, seed and step budget for the two networks
trained from scratch (CResMD and the 3-D HyperRes); TASNet is by its method the CResMD plus a
search and a fine-tuning (450 steps each here), so it has those steps on top. The FLOPs column
of each table says what each network costs. ``compare.md`` collects the tables and the commands.
A finished step is kept when the folder is reused (its product exists); delete it to rerun.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PIPELINE_STAGES = "pipeline.stages=[cresmd,search,derive,finetune]"
MODELS = ("CResMD", "TASNet", "HyperRes3D")


def available_protocols() -> list[str]:
    """``grid`` and the blind-setting protocols that exist in ``conf/protocol/``."""
    from cirlab.config import CONFIG_DIR

    names = sorted(p.stem for p in (Path(CONFIG_DIR) / "protocol").glob("blind_*.yaml"))
    return ["grid", *names]


def _run(command: list[str], log_file: Path) -> None:
    """One step; its output goes to ``log_file``; a failure names the command and the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("running: %s", shlex.join(command))
    with open(log_file, "a") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"step failed ({done.returncode}): {shlex.join(command)}\nlog: {log_file}\n{tail}")


def _hyperres_checkpoint(run_dir: Path) -> Path | None:
    from cirlab.checkpoints import best_checkpoint_recorded_in

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return Path(best_checkpoint_recorded_in(last) or last)


def run_compare(out: str | Path, *, protocols: Sequence[str] | None = None, pipeline_overrides: Sequence[str] = (),
                hyperres_overrides: Sequence[str] = (), eval_overrides: Sequence[str] = ("data=embedded",),
                python: str = sys.executable) -> dict:
    """Run the recipe (module docstring) in ``out``; returns ``{"checkpoints", "comparisons",
    "commands", "summary"}`` and writes ``out/compare.md`` and ``out/compare.json``."""
    from cirlab.utils.run import write_json_atomically, write_text_atomically

    out = Path(out).resolve()
    protocols = list(protocols) if protocols else available_protocols()
    known = set(available_protocols()) | {"grid"}
    from cirlab.config import CONFIG_DIR

    for name in protocols:  # before anything trains
        if not (Path(CONFIG_DIR) / "protocol" / f"{name}.yaml").is_file():
            raise ValueError(f"--protocols: {name!r} is not a protocol of conf/protocol/ ({sorted(known)})")
    commands: list[str] = []

    pipeline_dir = out / "pipeline"
    manifest_path = pipeline_dir / "pipeline.json"
    command = [python, "-m", "cirlab.cli.pipeline", PIPELINE_STAGES, f"hydra.run.dir={pipeline_dir}", *pipeline_overrides]
    commands.append(shlex.join(command))
    if not manifest_path.is_file():
        _run(command, out / "logs" / "pipeline.log")
    products = json.loads(manifest_path.read_text())["products"]

    hyperres_dir = out / "hyperres_3d"
    command = [python, "-m", "cirlab.cli.train", "experiment=hyperres_3d_compare", f"hydra.run.dir={hyperres_dir}",
               *hyperres_overrides]
    commands.append(shlex.join(command))
    if not (hyperres_dir / "metrics.json").is_file():
        resume = ["ckpt_path=last"] if (hyperres_dir / "checkpoints" / "last.ckpt").is_file() else []
        _run(command + resume, out / "logs" / "hyperres_3d.log")
    hyperres_ckpt = _hyperres_checkpoint(hyperres_dir)
    if hyperres_ckpt is None:
        raise RuntimeError(f"{hyperres_dir}: training left no checkpoints/last.ckpt")

    checkpoints = {"CResMD": products["cresmd_ckpt"], "TASNet": products["tasnet_ckpt"], "HyperRes3D": str(hyperres_ckpt)}
    models = "models={" + ",".join(f"{name}:{path}" for name, path in checkpoints.items()) + "}"
    comparisons, sections = {}, []
    for name in protocols:
        folder = out / "eval" / name
        command = [python, "-m", "cirlab.cli.eval", f"protocol={name}", models, f"hydra.run.dir={folder}",
                   *eval_overrides]
        commands.append(shlex.join(command))
        if not (folder / "comparison.json").is_file():
            _run(command, out / "logs" / f"eval_{name}.log")
        comparisons[name] = json.loads((folder / "comparison.json").read_text())
        sections.append((folder / "comparison.md").read_text())

    summary = out / "compare.md"
    text = [f"# CResMD, TASNet and the 3-D HyperRes on the same data and scale ({dt.date.today()})", "",
            "Recipe: cirlab.evaluation.recipe (make compare). Checkpoints:", ""]
    text += [f"* {name}: `{path}`" for name, path in checkpoints.items()]
    text += ["", "Commands:", "", "```", *commands, "```", ""]
    text += ["\n".join(line.replace("# ", "## ", 1) if line.startswith("# ") else line
                       for line in section.splitlines()) for section in sections]
    write_text_atomically(summary, "\n".join(text) + "\n")
    result = {"checkpoints": checkpoints, "comparisons": comparisons, "commands": commands, "summary": str(summary)}
    write_json_atomically(out / "compare.json", result)
    return result
