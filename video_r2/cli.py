"""`video-r2`: the utility commands, routed before LightningCLI is built, else LightningCLI.

    video-r2 fit --config configs/sft.yaml        # LightningCLI: fit | validate | test | predict
    video-r2 merge-lora --help                    # plain functions, one per command
    video-r2 make-demo --out demo
    video-r2 check-data --data-path ... --video-folder ...
    video-r2 plot runs/demo-sft

Each utility command is one typed function; jsonargparse turns its signature and docstring into flags
and `--help`. Modules are imported only when their command runs, so `video-r2 --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one line for `video-r2 --help`)
UTILITY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "merge-lora": ("video_r2.merge_lora", "merge_lora", "fold a LoRA adapter into its base model (HF checkpoint out)"),
    "make-demo": ("video_r2.synthetic", "make_demo", "write the tiny Qwen2.5-VL checkpoint and the synthetic dataset"),
    "check-data": ("video_r2.data.check", "check_data", "validate a dataset (records, videos, subtitles, token lengths)"),
    "plot": ("video_r2.plot", "plot_run", "draw loss, rewards, KL and lengths of a run from its TensorBoard logs"),
    "evaluate": ("video_r2.evaluate", "evaluate", "held-out accuracy, format and TAR of a checkpoint on a dataset"),
    "inspect": ("video_r2.inspect", "inspect", "an HTML report of how TAR scored samples of an evaluation"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
POSITIONAL_COMMANDS = {"plot", "inspect"}  # `video-r2 plot RUN_DIR`, `video-r2 inspect EVAL_JSON`; the others: --flags


def _underscore_flag(arg: str) -> str:
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value

_USAGE = """usage: video-r2 <command> [options]

Training (LightningCLI; the YAML's model.class_path picks the stage):
  fit          train: video-r2 fit --config configs/sft.yaml | configs/grpo.yaml
  validate     run the validation loop of a config on its val data

Utilities:
{utilities}

Run `video-r2 <command> --help` for a command's options.
"""


def _usage() -> str:
    lines = "\n".join(f"  {name:<12} {text}" for name, (_, _, text) in UTILITY_COMMANDS.items())
    return _USAGE.format(utilities=lines)


_RUN_MARKERS = ("config.yaml", "checkpoints", "hf")  # what a fit leaves in its log directory


def refuse_existing_run(log_dir: str | None, ckpt_path: str | None, overwrite_run: bool) -> None:
    """Stop a fit that would write into another run's directory (its config, checkpoints and exports
    would be replaced and its TensorBoard curves mixed with the new ones).

    Allowed: an empty or new directory, resuming from a checkpoint inside that directory, or
    `--overwrite_run true`, which deletes the old run first so nothing of it is mixed in.
    """
    import shutil
    from pathlib import Path

    if not log_dir or not Path(log_dir).is_dir():
        return
    run = Path(log_dir).resolve()
    found = [name for name in _RUN_MARKERS if (run / name).exists()]
    if not found:
        return
    if ckpt_path and run in Path(ckpt_path).resolve().parents:
        return  # resuming this very run
    if overwrite_run:
        print(f"--overwrite_run: deleting the previous run in {run}")
        shutil.rmtree(run)
        return
    raise SystemExit(
        f"video-r2: {log_dir} already holds a run ({', '.join(found)}). Pick another "
        "--trainer.logger.init_args.name/version, resume it with --ckpt_path "
        f"{Path(log_dir) / 'checkpoints' / 'last.ckpt'}, or pass --overwrite_run true to delete it first."
    )


def run_lightning_cli(args: list[str]) -> None:
    """Build LightningCLI over our modules; `args` starts with the subcommand (fit, validate, ...)."""
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    from video_r2.data import VideoDataModule

    class VideoR2CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--overwrite_run", type=bool, default=False,
                                help="delete a previous run in the log directory instead of refusing to start")

        def before_fit(self) -> None:
            if self.trainer.global_rank != 0:  # rank 0 decides; the others may start after it wrote config.yaml
                return
            config = self.config[self.subcommand]
            refuse_existing_run(self.trainer.log_dir, config.get("ckpt_path"), bool(config.get("overwrite_run")))

    VideoR2CLI(
        LightningModule,
        VideoDataModule,
        subclass_mode_model=True,  # model.class_path: video_r2.sft.SFTModule | video_r2.grpo.GRPOModule
        save_config_kwargs={"overwrite": True},
        args=None if args == sys.argv[1:] else args,  # None: LightningCLI reads sys.argv itself, without a warning
        auto_configure_optimizers=False,  # each module builds its own parameter groups and schedule
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command in UTILITY_COMMANDS:
        from jsonargparse import auto_cli

        module_name, function_name, _ = UTILITY_COMMANDS[command]
        function = getattr(importlib.import_module(module_name), function_name)
        # Flags may be written --data-path or --data_path; jsonargparse knows the underscore form.
        rest = [_underscore_flag(a) for a in rest]
        auto_cli(function, args=rest, as_positional=command in POSITIONAL_COMMANDS)
        return
    if command in LIGHTNING_COMMANDS:
        run_lightning_cli(argv)
        return
    print(f"video-r2: unknown command {command!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
