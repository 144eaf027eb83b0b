"""``agentd train`` and ``agentd eval``: train a backbone on synthetic agent episodes, and measure
a checkpoint on held-out episodes through the daemon's own loop code.

train: a curriculum (single turns, then whole episodes, then long streams with the state carried)
of synthetic transcripts in the control vocabulary (models.data), with AdamW, warm-up and cosine
decay, gradient clipping, a NaN guard and checkpoints; running it again on the same --out resumes.
User text files given with --text are mixed into the episode and stream stages.

eval: held-out templates and values (phrasings, names and numbers never trained on), each episode
run through agentd.agent.Agent: generation with the configured sampling, EXEC through the real
sandbox, recall through the real memory store. Prints per-skill accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agentd.config import Config, ConfigError

# The shipped default checkpoint's recipe (README, "Training"): `agentd train --out DIR` with no
# other option reproduces it.
DEFAULT_BACKBONE = "nexus"
DEFAULT_PRESET = "small"
DEFAULT_STEPS = 8000
DEFAULT_WEIGHTS = "arithmetic=4,fact=4,calm=1,alert=1,chat=1"
DEFAULT_STAGES = "0.6,0.3,0.1"


def _weights(text: str) -> dict[str, float]:
    from models.data import SKILLS

    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in SKILLS:
            raise argparse.ArgumentTypeError(f"{part!r}: expected SKILL=WEIGHT with SKILL one of {', '.join(SKILLS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: {value!r} is not a number") from None
        if out[name] < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: a weight cannot be negative")
    return out


def _stages(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers") from None
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"{text!r}: three non-negative fractions summing to 1 (segments,episodes,streams)")
    return parts  # type: ignore[return-value]


def _option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def add_parser(sub: Any) -> None:
    """Add the ``train`` and ``eval`` commands to the CLI's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    t: argparse.ArgumentParser = sub.add_parser(
        "train", help="train a backbone on synthetic agent episodes", formatter_class=fmt,
        description=__doc__.split("\n\n")[1] + "\n\nWith only --out it runs the first phase of the shipped default's recipe (README, Training).")
    t.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"architecture to train (default: {DEFAULT_BACKBONE})")
    t.add_argument("--preset", default=DEFAULT_PRESET, choices=("tiny", "small"),
                   help="model size: tiny (d_model 64, 2 layers) or small (128, 4) (default: %(default)s)")
    t.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="an architecture Config override on top of the preset (JSON value), repeatable")
    t.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps in all (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=16, help="rows per step (default: %(default)s)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per row / stream chunk (default: %(default)s)")
    t.add_argument("--stream-chunks", type=int, default=2, help="chunks per stream row, state carried (default: %(default)s)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--stages", type=_stages, default=_stages(DEFAULT_STAGES), metavar="S,E,T",
                   help=f"fractions of the steps for segments, episodes, streams (default: {DEFAULT_STAGES})")
    t.add_argument("--weights", type=_weights, default=_weights(DEFAULT_WEIGHTS), metavar="SKILL=W,...",
                   help=f"how often each skill is drawn (default: {DEFAULT_WEIGHTS})")
    t.add_argument("--mem-noise", type=float, default=0.25,
                   help="share of chat/arithmetic turns preceded by unrelated recalled memories (default: %(default)s)")
    t.add_argument("--novel-subjects", type=float, default=0.5,
                   help="share of told facts whose subject is a made-up noun, so answers copy it (default: %(default)s)")
    t.add_argument("--paraphrase", type=float, default=0.6,
                   help="share of questions and told facts in extra training phrasings (default: %(default)s)")
    t.add_argument("--keyword-first", type=float, default=0.0,
                   help="share of extra string-work phrasings with the operation's keyword before the word, "
                        "not opening the question: \"in uppercase, write X\" (default: %(default)s)")
    t.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="a UTF-8 text file to mix into the episode and stream stages, repeatable")
    t.add_argument("--text-mix", type=float, default=0.1, help="share of rows taken from --text files (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: %(default)s)")
    t.add_argument("--threads", type=int, default=2, help="torch threads; 0 leaves torch's default (default: %(default)s)")
    t.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: %(default)s)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (log lines every --log-every steps instead)")
    t.add_argument("--log-every", type=int, default=10, help="steps between logged scalars (default: %(default)s)")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars under OUT/tb (needs the tensorboard package)")
    t.add_argument("--out", required=True, help="checkpoint directory; an existing run there is resumed")

    e: argparse.ArgumentParser = sub.add_parser(
        "eval", help="measure a checkpoint on held-out episodes through the agent loop", formatter_class=fmt,
        description=__doc__.split("\n\n")[2])
    e.add_argument("--checkpoint", help="checkpoint directory (default: the configured / bundled backbone)")
    e.add_argument("--episodes", type=int, default=20, help="held-out episodes per skill (default: %(default)s)")
    e.add_argument("--skills", default="", help="comma-separated subset of the skills (default: all)")
    e.add_argument("--seed", type=int, default=1, help="held-out episode seed (default: %(default)s)")
    e.add_argument("--temperature", type=float, help="sampling temperature (default: [backbone] temperature)")
    e.add_argument("--exec-temperature", type=float,
                   help="sampling temperature inside EXEC code (default: [backbone] exec_temperature)")
    e.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    e.add_argument("--verbose", "-v", action="store_true", help="print every episode's events")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "train":
        return _train(args)
    return _eval(args, config)


# -- train ----------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> int:
    import torch

    from models.base import ModelError
    from models.data import AgentCurriculum
    from models.train import TrainConfig, Trainer

    texts: list[str] = []
    for path in args.text:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            print(f"agentd train: cannot read text file {path}: {exc}", file=sys.stderr)
            return 2
    try:
        cfg = TrainConfig(backbone=args.backbone, preset=args.preset, options=dict(args.option), steps=args.steps,
                          batch_size=args.batch_size, seq_len=args.seq_len, stream_chunks=args.stream_chunks,
                          lr=args.lr, warmup=args.warmup, stages=args.stages, seed=args.seed, threads=args.threads,
                          checkpoint_every=args.checkpoint_every, log_every=args.log_every)
        curriculum = AgentCurriculum(args.seed, texts, args.text_mix, weights=args.weights, mem_noise=args.mem_noise,
                                     novel_subjects=args.novel_subjects, paraphrase=args.paraphrase,
                                     keyword_first=args.keyword_first)
    except ValueError as exc:
        print(f"agentd train: {exc}", file=sys.stderr)
        return 2
    from models.base import available

    if args.backbone not in available():
        print(f"agentd train: unknown backbone {args.backbone!r}; known: {', '.join(available())}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tb = _tensorboard(Path(args.out)) if args.tensorboard else None
    progress = not args.no_progress and sys.stderr.isatty()

    def on_log(row: dict[str, Any]) -> None:
        if tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                tb.add_scalar(f"train/{k}", row[k], row["step"])
        if not progress:
            print(f"step {row['step']:>6}  stage {row['stage']}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)

    try:
        trainer = Trainer(cfg, curriculum, args.out, on_log=on_log)
        if trainer.start_step:
            print(f"agentd train: resuming {args.out} at step {trainer.start_step}", file=sys.stderr)
        if trainer.start_step >= cfg.steps:
            print(f"agentd train: {args.out} is already trained to {trainer.start_step} steps", file=sys.stderr)
            return 0
        res = trainer.run(progress=progress)
    except (ModelError, TypeError) as exc:
        print(f"agentd train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentd train: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if tb is not None:
            tb.close()
    print(json.dumps({"out": res.out, "steps": res.steps, "first_loss": round(res.first_loss, 4),
                      "last_loss": round(res.last_loss, 4), "skipped_steps": res.skipped_steps, "tokens": res.tokens,
                      "seconds": round(res.seconds, 1)}))
    return 0


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("agentd train: --tensorboard needs the tensorboard package; scalars stay in OUT/scalars.jsonl",
              file=sys.stderr)
        return None
    return SummaryWriter(str(out / "tb"))


def _quiet_logs() -> None:
    """The daemon's info lines (one per turn) would bury the report: warnings and errors only."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


# -- eval -----------------------------------------------------------------------------------------
def _eval(args: argparse.Namespace, config: Config) -> int:
    import torch

    from agentd import evaluate
    from models.base import ModelError
    from models.data import SKILLS

    skills = [s.strip() for s in args.skills.split(",") if s.strip()] or list(SKILLS)
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        print(f"agentd eval: unknown skill(s) {', '.join(unknown)}; known: {', '.join(SKILLS)}", file=sys.stderr)
        return 2
    if args.episodes < 1:
        print("agentd eval: --episodes must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_logs()
    try:
        report = evaluate.run(config, checkpoint=args.checkpoint, skills=skills, episodes=args.episodes, seed=args.seed,
                              temperature=args.temperature, verbose=args.verbose,
                              exec_temperature=args.exec_temperature)
    except ConfigError as exc:  # --temperature / --exec-temperature out of range
        print(f"agentd eval: {exc}", file=sys.stderr)
        return 2
    except (ModelError, evaluate.EvalError) as exc:
        print(f"agentd eval: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report))
    else:
        print(evaluate.format_report(report))
    return 0

