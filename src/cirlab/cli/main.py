"""`cirlab <command> [arguments]`: one entry point for every cirlab command.

The arguments after the command name go to that command unchanged, so Hydra commands keep their
`key=value` overrides (and `--help`, `-m`, `--shell-completion`) and argparse commands their
`--flags`. Each command is also installed as its own script (`cirlab-train`, `cirlab-restore`, ...).
Only the chosen command's module is imported: `cirlab --help` and `cirlab --completion bash` import
neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

#: command -> (module under cirlab.cli, Hydra app?, one-line summary); the order of `cirlab --help`
COMMANDS: dict[str, tuple[str, bool, str]] = {
    "train": ("train", True, "one training job of conf/train.yaml (Hydra overrides, e.g. experiment=cresmd_paper)"),
    "pipeline": ("pipeline", True, "the TASNet stages of conf/pipeline.yaml: CResMD, search, derive, fine-tune, test"),
    "eval": ("eval", True, "score a checkpoint under a protocol of conf/protocol/ (Hydra overrides)"),
    "sweep": ("sweep", False, "run or resume an Optuna study (Hydra overrides), or `sweep summarize` a sweep"),
    "derive": ("derive", False, "turn a TASNet search checkpoint into a standalone TASNet"),
    "restore": ("restore", False, "restore one image under several task vectors"),
    "bench": ("bench", False, "measured figures: data throughput, search step, cost, sharing, training"),
    "data": ("data", False, "download DIV2K and CBSD68 into the layout cirlab expects"),
    "hyperres-eval": ("hyperres_eval", False, "PSNR against degradation level for HyperRes and dedicated models"),
    "export": ("export", False, "a checkpoint's network as safetensors + architecture JSON, loadable without cirlab's "
                                "training code"),
    "compare": ("compare", False, "train CResMD, TASNet and the 3-D HyperRes alike and score them side by side"),
}

COMPLETION_SHELLS = ("bash",)

USAGE = "usage: cirlab [-h] [--completion bash] <command> [arguments...]"


def help_text() -> str:
    """The top-level help: every command with its summary, and where each command's own help is."""
    width = max(len(name) for name in COMMANDS)
    lines = [USAGE, "", "Controllable image restoration (CResMD, TASNet, HyperRes): one entry point.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help           show this message and exit",
        "  --completion bash    print a bash completion script for the command names and exit",
        "                       (eval \"$(cirlab --completion bash)\" in ~/.bashrc)",
        "",
        "`cirlab <command> --help` shows a command's own help. train, pipeline and eval take Hydra",
        "overrides (key=value; their shell completion: `cirlab-train --shell-completion install=bash`);",
        "the others take --flags. Every command is also the script cirlab-<command>.",
    ]
    return "\n".join(lines) + "\n"


def bash_completion() -> str:
    """A bash completion script: command names after `cirlab`; a Hydra command's own completion
    (its overrides) when one of them follows; file names otherwise."""
    names = " ".join(COMMANDS)
    hydra = " ".join(name for name, (_, is_hydra, _) in COMMANDS.items() if is_hydra)
    return f"""\
# bash completion for cirlab: eval "$(cirlab --completion bash)"
_cirlab() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "{names} --help --completion" -- "$cur"))
        return
    fi
    case " {hydra} " in
        *" ${{COMP_WORDS[1]}} "*)
            # Hydra's completion of overrides (key=value) for train / pipeline / eval
            local line="${{COMP_LINE#cirlab ${{COMP_WORDS[1]}}}}"
            COMPREPLY=($(COMP_POINT=-1 COMP_LINE="cirlab-${{COMP_WORDS[1]}}$line" \\
                cirlab-${{COMP_WORDS[1]}} -sc query=bash 2>/dev/null))
            return;;
    esac
    COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -o nospace -o default -F _cirlab cirlab
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point `cirlab`: dispatch `argv[0]` to its command with the rest of `argv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text(), end="")
        return 0 if argv else 2
    if argv[0] == "--completion":
        shell = argv[1] if len(argv) > 1 else "bash"
        if shell not in COMPLETION_SHELLS:
            print(f"cirlab: --completion {shell}: only {', '.join(COMPLETION_SHELLS)} is supported", file=sys.stderr)
            return 2
        print(bash_completion(), end="")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE}\ncirlab: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, is_hydra, _ = COMMANDS[name]
    module = importlib.import_module(f"cirlab.cli.{module_name}")
    if is_hydra:
        # a Hydra app reads sys.argv itself; its program name appears in its help and completion
        sys.argv = [f"cirlab-{name}", *rest]
        result = module.main()
    else:
        result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
