"""The `al` command line: train, eval, predict, export, study; installed packages add more (serve, worker,
bench)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from al.config import ARCHS, INITS, LR_SCALINGS, METHODS, PIPELINES, PRESETS
from al.export import FORMATS
from al.trainer import Callback


class ProgressBar(Callback):
    """One line on stderr, redrawn at most ten times a second."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.last = 0.0

    def on_step(self, trainer):
        if not self.stream.isatty():  # logs get the epoch lines only
            return
        now = time.monotonic()
        if now - self.last < 0.1 and trainer.step_in_epoch != trainer.steps_per_epoch:
            return
        self.last = now
        done = trainer.step_in_epoch / trainer.steps_per_epoch
        bar = "#" * int(done * 30)
        self.stream.write(
            f"\repoch {trainer.epoch + 1}/{trainer.cfg.epochs} [{bar:<30}] "
            f"{trainer.step_in_epoch}/{trainer.steps_per_epoch}"
        )
        self.stream.flush()

    def on_epoch_end(self, trainer, metrics):
        val = metrics.get("val_accuracy")
        val_text = f" val_acc {val:.4f}" if val is not None else ""
        line = f"epoch {metrics['epoch']}/{trainer.cfg.epochs} {metrics['seconds']:.1f}s{val_text}"
        self.stream.write(f"\r{line:<60}\n")
        self.stream.flush()


COMMANDS_GROUP = "al.commands"  # each entry point names a function that adds subparsers: f(sub)
EXIT_CONFIDENCE_HELP = ("early exit: a sample stops at the first depth (up to --depth) whose top probability "
                        "reaches X (0..1)")


def _integers(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def cmd_train(args) -> None:
    from al.checkpoint import read_model_info
    from al.config import from_spec
    from al.run import train

    model = {
        "arch": args.arch,
        "widths": args.widths,
        "target_width": args.target_width,
        "bridge_pool": args.bridge_pool,
        "h1_loss": args.h1_loss,
        "bridge_convs": args.bridge_convs,
        "target_widths": args.target_widths,
        "init": args.init,
        "embedding_dim": args.embedding_dim,
        "heads": args.heads,
        "max_tokens": args.max_tokens,
        "vocab_size": args.vocab_size,
        "text_column": args.text_column,
    }
    training = {
        "method": args.method,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "schedule": args.schedule,
        "target_lr_factor": args.target_lr_factor,
        "bridge_lr_factor": args.bridge_lr_factor,
        "lr_scaling": args.lr_scaling,
        "lr_reference_batch": args.lr_reference_batch,
        "lr_warmup": args.lr_warmup,
        "target_warmup": args.target_warmup,
        "device": args.device,
        "pipeline": args.pipeline,
        "devices": args.devices,
        "stages": args.stages,
        "queue_depth": args.queue_depth,
        "stage_threads": args.stage_threads,
    }
    spec = {"preset": args.preset, "model": model, "training": training, "train_components": args.train_components}
    init_model = None
    if args.init_from is not None:
        init_model = read_model_info(args.init_from).config
        spec["init_from"] = {"directory": str(Path(args.init_from).resolve())}  # the new model's lineage
    callbacks = [] if args.quiet else [ProgressBar()]
    result = train(args.dataset, args.out, from_spec(spec, init_model), callbacks, resume=args.resume)
    if result["status"] != "stage worker":  # a torchrun rank > 0 trains a stage and writes no model
        result = {**result, "model": str(args.out)}
    _emit(result, args.json)


def cmd_eval(args) -> None:
    from al.run import evaluate

    _emit(evaluate(args.model, args.dataset, args.depth, args.split, args.exit_confidence), args.json)


def cmd_predict(args) -> None:
    from al.checkpoint import load_model
    from al.data import TEXT_COLUMN, read_inputs

    model = load_model(args.model)
    x = read_inputs(Path(args.input), model.config["model"].get("text_column", TEXT_COLUMN))
    predictions, probabilities, depths = model.predict(model.request(x, args.depth, args.exit_confidence))
    if args.json:
        print(json.dumps({"predictions": predictions, "probabilities": probabilities, "depths": depths}))
    else:
        for p, probs in zip(predictions, probabilities):
            print(f"{p}\t{max(probs):.4f}")


def cmd_export(args) -> None:
    import logging
    import warnings

    from al.checkpoint import write_atomic
    from al.export import export_model

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on what it leaves out (torchvision's ops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on its own deprecated internals
        exported = export_model(args.model, args.format, args.depth)
    write_atomic(Path(args.out), exported.content)
    _emit({"out": args.out, "format": args.format, "depth": exported.depth, "bytes": len(exported.content)},
          args.json)


def cmd_study(args) -> None:
    from al.study import parse_goal, run_local

    space = json.loads(Path(args.space).read_text())
    base = json.loads(Path(args.base).read_text()) if args.base else {}
    base.setdefault("preset", args.preset)
    goal = parse_goal({"objective": args.objective, "target": args.target, "objectives": args.objectives})
    callbacks = (lambda number: []) if args.quiet else (lambda number: [ProgressBar()])
    result = run_local(args.dataset, base, space, args.trials, args.out, seed=args.seed, callbacks=callbacks,
                       goal=goal)
    _emit(result, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="al", description="Associated Learning: train, evaluate, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub)
    add_eval(sub)
    add_predict(sub)
    add_export(sub)
    add_study(sub)
    add_installed_commands(sub)
    return parser


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a directory")
    p.add_argument("--dataset", required=True, help="digits, mnist, fashion-mnist, kmnist, or a .npz/.csv file "
                   "(a CSV with a text column holds texts, for --arch lstm or transformer)")
    p.add_argument("--arch", choices=ARCHS, default=None)
    p.add_argument("--widths", type=_integers, default=None, help="encoder widths/channels, e.g. 512,512 (lstm: hidden "
                   "units per direction of each layer; transformer: feed-forward width of each layer)")
    p.add_argument("--target-width", type=int, default=None, help="n, the width of t_i")
    p.add_argument("--bridge-pool", type=int, default=None, help="conv maps: pool to PxP before the bridge")
    p.add_argument("--h1-loss", choices=("mse", "ce"), default=None)
    p.add_argument("--bridge-convs", type=int, choices=(0, 1, 2), default=None,
                   help="conv maps: conv layers in each bridge before the pooling")
    p.add_argument("--target-widths", type=_integers, default=None, help="the width of each t_i, e.g. 64,128")
    p.add_argument("--init", choices=INITS, default=None, help="initial weights (default he_normal, as R1)")
    p.add_argument("--embedding-dim", type=int, default=None, help="lstm, transformer: width of the token embeddings")
    p.add_argument("--heads", type=int, default=None, help="transformer: attention heads of each layer")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="lstm, transformer: tokens a text keeps; a longer text is cut (default 64)")
    p.add_argument("--vocab-size", type=int, default=None, help="lstm, transformer: most distinct tokens (default "
                   "8000), learnt from the training split")
    p.add_argument("--text-column", default=None, help="the CSV column that holds the texts (default: text)")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--schedule", choices=("step", "cosine", "none"), default=None)
    p.add_argument("--target-lr-factor", type=float, default=None, help="AL: g and h learn at lr * factor")
    p.add_argument("--bridge-lr-factor", type=float, default=None, help="AL: b learns at lr * factor")
    p.add_argument("--lr-scaling", choices=LR_SCALINGS, default=None,
                   help="scale lr with batch_size / --lr-reference-batch (default none)")
    p.add_argument("--lr-reference-batch", type=int, default=None, help="the batch size lr is given for")
    p.add_argument("--lr-warmup", type=int, default=None, help="steps of linear learning-rate warm-up")
    p.add_argument("--target-warmup", type=int, default=None, help="AL: steps of warm-up of g and h's lr")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (CUDA if present), cpu, cuda:0, ...")
    p.add_argument("--pipeline", choices=PIPELINES, default=None,
                   help="AL stages trained at once: threads in this process, or one process per stage")
    p.add_argument("--devices", type=lambda text: text.split(","), default=None,
                   help="one device per stage, e.g. cpu,cpu or cuda:0,cuda:1 (default: the cores or GPUs)")
    p.add_argument("--stages", default=None, help="components per stage, e.g. 0-1,2-3 (default: balanced by time)")
    p.add_argument("--queue-depth", type=int, default=None, help="mini-batches waiting between stages (default 2)")
    p.add_argument("--stage-threads", type=int, default=None, help="CPU threads per stage (default: cores shared)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from the trained model in DIR: its weights, architecture, method and input encoding, "
                   "on a dataset of the same input shape and classes (training settings come from this command)")
    p.add_argument("--train-components", type=_integers, default=None, metavar="K,...",
                   help="with --init-from: train only these components, numbered from 1 (e.g. 3,4); the others stay "
                   "frozen (default: all train)")
    p.add_argument("--out", default="model", help="model directory (default: ./model)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_train)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a model on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--depth", type=int, default=None, help="shortcut inference at depth K (default: full)")
    p.add_argument("--split", choices=("test", "all"), default="test")
    p.add_argument("--exit-confidence", type=float, default=None, metavar="X",
                   help=EXIT_CONFIDENCE_HELP + "; the result adds mean_depth")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict the classes of the samples in a file: one line each, the class "
                       "(a text model's: its label) and its probability, tab-separated")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, help=".npz with array x, or .csv; a text model: a .csv with its text "
                   "column, or a .txt of one text per line")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--exit-confidence", type=float, default=None, metavar="X",
                   help=EXIT_CONFIDENCE_HELP + "; --json gives the depth of each row")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write the inference path at a depth as a file for other runtimes (ONNX: "
                       "raw input in, probabilities out, the class names in its metadata; see docs/service.md)")
    p.add_argument("--model", required=True)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--depth", type=int, default=None, help="the path f_1..f_K -> b_K -> h_K..h_1 (default: full)")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)


def add_study(sub) -> None:
    p = sub.add_parser("study", help="search hyperparameters with Optuna, locally (see docs/service.md, studies)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--trials", type=int, required=True, help="trials to run, one after another")
    p.add_argument("--space", required=True, help='JSON file: {"training.lr": {"type": "float", "low": 1e-4, '
                   '"high": 1e-2, "log": true}, ...}')
    p.add_argument("--base", default=None, help="JSON file: the job spec's model, method, preset and training "
                   "every trial starts from")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="when --base names none")
    p.add_argument("--seed", type=int, default=None, help="seeds the sampler")
    p.add_argument("--objective", default=None,
                   help="val_accuracy (default: maximised) or time_to_accuracy (train seconds to --target)")
    p.add_argument("--target", type=float, default=None, help="time_to_accuracy: the validation accuracy to reach")
    p.add_argument("--objectives", type=lambda text: text.split(","), default=None,
                   help="val_accuracy,train_seconds: a Pareto front instead of one objective")
    p.add_argument("--out", default="study", help="each trial's model goes to OUT/trial-N (default: ./study)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_study)


def add_installed_commands(sub) -> None:
    """The commands that installed packages add under the entry-point group `al.commands` (`al serve` from
    app/, `al worker` from worker/, `al bench` from benchmarks/): this library imports none of them.

    An entry point whose module is not installed (an image built without the benchmarks) adds nothing;
    any other failure to load one is an error."""
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):  # a stable order in --help
        try:
            add_commands = entry.load()
        except ModuleNotFoundError as e:
            if not f"{entry.module}.".startswith(f"{e.name}."):
                raise  # the module is there but imports something missing: a broken install, said loudly
            continue
        add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # DataError, ModelError and config errors: the message names the problem
        print(f"al {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
