r"""A run's loss and eval-loss curves (or any logged metrics, one panel each), read from its
TensorBoard event files, as a PNG.

  pip install -e ".[plot]"   # matplotlib
  python benchmarks/plot_run.py /tmp/phi4 --out docs/tiny_run.png
  python benchmarks/plot_run.py /tmp/phi4-grpo --out grpo.png \
      --metrics reward,sample_accuracy,accuracy,kl,response_tokens --table 10

Every event file of `<workdir>/tensorboard` is read (a resumed run writes one per start);
a later file's value wins for a step logged twice.
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def _records(path: Path):
    """The payloads of a TFRecord file (TensorBoard's event format)."""
    data, offset = path.read_bytes(), 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        yield data[offset + 12:offset + 12 + length]
        offset += 16 + length


def read_scalars(workdir: str | Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value over every event file of the run, oldest first."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(workdir, "tensorboard").glob("events.out.tfevents.*")):
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def plot(scalars: dict[str, dict[int, float]], out: str | Path, title: str) -> None:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for tag, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss (held out)", "o-")):
        points = sorted(scalars.get(tag, {}).items())
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_panels(scalars: dict[str, dict[int, float]], tags: list[str], out: str | Path,
                title: str) -> None:
    """One panel per tag, sharing the step axis; a tag logged only at evaluations is drawn
    with markers."""
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, axes = plt.subplots(len(tags), 1, figsize=(6.4, 1.9 * len(tags)), dpi=100, sharex=True,
                             squeeze=False)
    for ax, tag in zip(axes[:, 0], tags):
        points = sorted(scalars[tag].items())
        ax.plot(*zip(*points), "o-" if len(points) < 12 else "-", markersize=4)
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def markdown_table(scalars: dict[str, dict[int, float]], tags: list[str], every: int) -> str:
    """The tags' values at every `every`-th step and the last one (blank where not logged)."""
    steps = sorted({step for tag in tags for step in scalars[tag]})
    shown = [step for step in steps if step % every == 0 or step == steps[-1]]
    lines = ["| step | " + " | ".join(tags) + " |", "|---:|" + "---:|" * len(tags)]
    for step in shown:
        cells = [f"{scalars[tag][step]:.4g}" if step in scalars[tag] else "" for tag in tags]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the run's --workdir")
    parser.add_argument("--out", default="run.png", help="the PNG to write")
    parser.add_argument("--title", default="", help="plot title (default: the workdir)")
    parser.add_argument("--metrics", default="",
                        help="comma-separated logged metrics, one panel each (default: loss)")
    parser.add_argument("--table", type=int, default=0, metavar="EVERY",
                        help="also print the --metrics as a Markdown table, every EVERY steps")
    args = parser.parse_args()
    scalars = read_scalars(args.workdir)
    if args.metrics:
        tags = args.metrics.split(",")
        missing = [tag for tag in tags if tag not in scalars]
        if missing:
            raise SystemExit(f"error: no {missing} scalars under {args.workdir}/tensorboard; "
                             f"logged: {sorted(scalars)}")
        plot_panels(scalars, tags, args.out, args.title or str(args.workdir))
        print(f"wrote {args.out}: " + ", ".join(f"{len(scalars[t])} {t}" for t in tags))
        if args.table:
            print(markdown_table(scalars, tags, args.table))
        return
    if "loss" not in scalars:
        raise SystemExit(f"error: no 'loss' scalars under {args.workdir}/tensorboard; was the run "
                         "started with --config.log.tensorboard=False?")
    plot(scalars, args.out, args.title or str(args.workdir))
    print(f"wrote {args.out}: {len(scalars['loss'])} loss and "
          f"{len(scalars.get('eval_loss', {}))} eval-loss points")


if __name__ == "__main__":
    main()
